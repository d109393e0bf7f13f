"""Command-line flags, each declared once and shared through argparse's `parents=` (as DINO does).

This module imports nothing heavy, so that every script's --help answers at once: the scripts
import torch only after their arguments are parsed. The paper's values come from common/paper.py;
each flag's help gives the default and the paper's value.
"""
import argparse
from pathlib import Path

from common.paper import (
    CELL_STRIDE, DEFAULT_ARCH, PAPER_BATCH_SIZE, PAPER_LR, PAPER_PATCH_SIZE, PAPER_SIZE, PAPER_STRIDE, PATCH_BATCH,
    PATCH_SCORE_STRIDE, STEPS_PER_EPOCH, VARIANTS
)

LOCALIZATION_MODES = ("auto", "none", "dense", "gradcam")
PATCH_DENSITIES = ("auto", "shared", "local")
GRADCAM_TARGETS = ("density", "logit")
# --density: the Gaussian stored in the checkpoint, or one refitted by the named estimator (density.py).
CHECKPOINT_DENSITY = "checkpoint"
DENSITY_ESTIMATORS = ("torch", "sklearn")
EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
RUNTIMES = ("auto", "eager", "onnxruntime", "openvino")
# --layout: the folder layouts dataset.py reads; auto detects them.
LAYOUTS = ("auto", "mvtec", "mvtec2", "loco", "visa", "folder")


def _parser(description: str | None = None, parents=()) -> argparse.ArgumentParser:
    if description is None:  # a parent: its flags are added to a script's parser, which owns --help
        return argparse.ArgumentParser(add_help=False)
    return argparse.ArgumentParser(description=description, parents=list(parents),
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=str, default="auto",
                   help="cpu, cuda, cuda:N, mps (Apple GPU), or auto (CUDA, else MPS, where available)")


def add_layout_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", type=str, choices=LAYOUTS, default="auto",
                   help="how --data_dir is laid out: MVTec AD (mvtec), MVTec AD 2 (mvtec2), MVTec LOCO AD (loco), "
                        "VisA (visa), a plain folder of good/ and defect folders (folder), or auto: detected")


def data_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--data_dir", type=Path, default=Path("Data"),
                   help="data root holding one folder per category, or one category's folder")
    p.add_argument("--type", type=str, default="all",
                   help="comma-separated categories, or 'all': every category in --data_dir (training) or with a "
                        "checkpoint (evaluation)")
    add_layout_flag(p)
    return p


def runtime_flags() -> argparse.ArgumentParser:
    """Where and how the network runs; 'auto' (None) picks the fastest settings for the hardware (runtime.py)."""
    p = _parser()
    add_device_flag(p)
    p.add_argument("--cuda", type=str, default=None, help="legacy: --cuda 1 means --device cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; default (None): on where the device runs bf16 natively (CUDA, CPUs with "
                        "AVX512-BF16 or AMX); for scoring only with --runtime eager")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format; default (None): training uses it with CUDA or bf16 and NCHW "
                        "for float32 on a CPU; eager scoring uses it everywhere (doc/performance.md)")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images (0: the main thread)")
    p.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, have glibc's malloc keep freed memory for the next batch instead of mapping "
                        "fresh pages (faster steps for about 0.5 GB more memory)")
    return p


def inference_flags() -> argparse.ArgumentParser:
    """How eval.py and predict.py run the scoring graph (scoring/inference.py)."""
    p = _parser()
    p.add_argument("--runtime", type=str, choices=RUNTIMES, default="auto",
                   help="what runs the scoring graph: eager PyTorch, or its ONNX graph in onnxruntime or openvino "
                        "(CPU, float32, scores within 1e-4 of eager float32); auto: onnxruntime on a CPU, unless "
                        "--amp or --channels_last is given or the backbone does not export, else eager")
    return p


def speed_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the training model in torch.compile")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each step's augmentation from a CUDA graph (one launch instead of about "
                        "1300); ignored on other devices")
    return p


def model_flags(one_run: bool = True) -> argparse.ArgumentParser:
    """What a model is: the settings a resumed or skipped run must share (runstate.RUN_KEYS). Without `one_run`
    less --variant and --seed, which reproduce.py's grid takes as lists (--variants, --seeds)."""
    p = _parser()
    if one_run:
        p.add_argument("--variant", type=str, choices=VARIANTS, default="3way",
                       help="CutPaste variant (section 3): normal, scar, union (2 classes) or 3way")
    p.add_argument("--epochs", type=int, default=STEPS_PER_EPOCH,
                   help=f"optimizer steps (Li et al. call {STEPS_PER_EPOCH} steps one 'epoch')")
    p.add_argument("--batch_size", type=int, default=PAPER_BATCH_SIZE,
                   help=f"clean images per step, each with 1 (2 for 3way) augmented copies (paper: "
                        f"{PAPER_BATCH_SIZE}, a batch of 64)")
    p.add_argument("--lr", type=float, default=PAPER_LR, help=f"learning rate, cosine-annealed (paper: {PAPER_LR})")
    p.add_argument("--optim", type=str, choices=("sgd", "adam"), default="sgd",
                   help="optimizer: sgd (paper: momentum 0.9, weight decay 3e-5) or adam")
    p.add_argument("--arch", type=str, default=DEFAULT_ARCH,
                   help=f"backbone: a torchvision classification model by name, e.g. {DEFAULT_ARCH} (paper), "
                        "resnet50, efficientnet_b0 ... efficientnet_b4")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from torchvision's ImageNet weights of --arch; --no-pretrained from scratch (paper)")
    p.add_argument("--freeze_resnet", type=int, default=20,
                   help="with --pretrained, train only the head for this many first steps")
    p.add_argument("--head_layer", type=int, default=1,
                   help="512-wide layers in the projection head, then 128, then the output (paper: 1)")
    p.add_argument("--size", type=int, default=PAPER_SIZE, help=f"images are resized to size x size (paper: "
                                                                f"{PAPER_SIZE})")
    p.add_argument("--patch_size", type=int, default=0,
                   help=f"train a patch-level model on random crops of this side, CutPaste inside each (section "
                        f"4.2, paper: {PAPER_PATCH_SIZE}); 0 trains on whole images")
    if one_run:
        p.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    return p


def training_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--model_dir", type=Path, default=Path("models"), help="where checkpoints are written")
    p.add_argument("--log_dir", type=Path, default=Path("logdirs"), help="tensorboard logs and run records")
    p.add_argument("--test_epochs", type=int, default=-1,
                   help="every this many steps log the test image AUROC (monitoring only, never used to pick a "
                        "checkpoint); -1 disables")
    p.add_argument("--log_every", type=int, default=32, help="steps between reads of the loss from the device")
    p.add_argument("--save_every", type=int, default=STEPS_PER_EPOCH,
                   help="steps between saved training states that --resume continues from; 0: only on Ctrl-C")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue each category from its saved state (same settings), skip finished ones")
    p.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=False,
                   help="train categories again even when --model_dir holds a finished checkpoint of them")
    return p


def training_parser(description: str = "Train CutPaste models, one per category.") -> argparse.ArgumentParser:
    """run_training.py's flags (training_args builds its arguments in code)."""
    return _parser(description, [data_flags(), model_flags(), training_flags(), runtime_flags(), speed_flags()])


def localization_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--localization", type=str, choices=LOCALIZATION_MODES, default="auto",
                   help="anomaly maps and pixel metrics: dense (patch scores, section 4.2), gradcam (image-level "
                        "models), none, or auto (dense for patch-level models, else none)")
    p.add_argument("--stride", type=int, default=PAPER_STRIDE,
                   help=f"stride of the test patches in dense scoring (paper: {PAPER_STRIDE})")
    p.add_argument("--patch_density", type=str, choices=PATCH_DENSITIES, default="auto",
                   help="dense scoring: one Gaussian for all positions (shared), one per location cell (local), or "
                        "auto: local for the aligned objects of appendix A.5, shared otherwise")
    p.add_argument("--cell_stride", type=int, default=CELL_STRIDE,
                   help="dense scoring: side in pixels of the location cells of the patch Gaussians")
    p.add_argument("--patch_batch", type=int, default=PATCH_BATCH, help="patches per forward pass in dense scoring")
    p.add_argument("--gradcam_target", type=str, choices=GRADCAM_TARGETS, default="density",
                   help="what GradCAM explains: density (the detector's Gaussian score) or logit (the "
                        "classifier's log-odds of 'augmented')")
    p.add_argument("--max_heatmaps", type=int, default=8,
                   help="with --save_plots 1, heatmap figures for at most this many test images per category")
    return p


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """How eval.py scores and what it draws; reproduce.py passes them on to its evaluations."""
    p.add_argument("--density", type=str, choices=(CHECKPOINT_DENSITY, *DENSITY_ESTIMATORS),
                   default=CHECKPOINT_DENSITY,
                   help="Gaussian of the embeddings (section 3.3): the one stored in the checkpoint, or refit on "
                        "--data_dir's training images with torch or sklearn (both Ledoit-Wolf)")
    p.add_argument("--save_plots", type=int, choices=(0, 1), default=1, help="1 writes ROC, histogram, t-SNE plots")


def eval_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--model_dir", type=Path, default=Path("models"), help="folder of checkpoints (*.tch)")
    p.add_argument("--out_dir", type=Path, default=Path("Eval"),
                   help="plots and tables go to out_dir/<model_dir name>")
    add_scoring_flags(p)
    p.add_argument("--report", type=int, choices=(0, 1), default=1,
                   help="1 writes out_dir/<model_dir name>/report.html: every test image as a card, sorted by score, "
                        "with predict.py's threshold and the mistakes at it (doc/report.md)")
    p.add_argument("--head_layer", type=int, default=None,
                   help="accepted for compatibility; the checkpoint's own head layout is used")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=False,
                   help="average every checkpoint of a category (e.g. 5 seeds) after standardising each model's "
                        "scores by its clean training scores (the paper's ensemble, Table 1)")
    return p


def eval_parser(description: str = "Evaluate CutPaste checkpoints on the test sets.") -> argparse.ArgumentParser:
    """eval.py's flags (eval_args builds its arguments in code)."""
    return _parser(description, [data_flags(), eval_flags(), localization_flags(), runtime_flags(),
                                 inference_flags()])


def grid_flags() -> argparse.ArgumentParser:
    """The flags reproduce.py shares with run_training.py and eval.py and passes on to each run of its grid: data,
    model (less --variant and --seed, which the grid takes as lists), runtime, and how eval.py scores."""
    p = argparse.ArgumentParser(add_help=False, parents=[data_flags(), model_flags(one_run=False), runtime_flags()])
    add_scoring_flags(p)
    return p


def arguments(parser: argparse.ArgumentParser, shared=None, **values) -> argparse.Namespace:
    """What `parser` would parse, built in code instead of from a command line: its defaults, then the values of
    the Namespace `shared` that it has flags for (another script's arguments), then `values`, each one of its flags
    by its name in the Namespace."""
    args = vars(parser.parse_args([]))
    if unknown := sorted(set(values) - set(args)):
        raise TypeError(f"no such flag: --{', --'.join(unknown)} ({parser.description})")
    common = {key: value for key, value in vars(shared or argparse.Namespace()).items() if key in args}
    return argparse.Namespace(**{**args, **common, **values})


def training_args(shared=None, **values) -> argparse.Namespace:
    """run_training.py's arguments built in code (`arguments` of training_parser), e.g. training_args(epochs=10)."""
    return arguments(training_parser(), shared, **values)


def eval_args(shared=None, **values) -> argparse.Namespace:
    """eval.py's arguments built in code (`arguments` of eval_parser), e.g. eval_args(model_dir=Path("models"))."""
    return arguments(eval_parser(), shared, **values)


def export_flags() -> argparse.ArgumentParser:
    """export.py's flags: which checkpoint, in which format, to which file."""
    p = _parser()
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint (.tch) to export")
    p.add_argument("--format", type=str, choices=EXPORT_FORMATS, default="onnx",
                   help="onnx (ONNX Runtime), openvino (IR: the .xml and its .bin beside it) or torchscript")
    p.add_argument("--out", type=Path, required=True,
                   help="file written: *.onnx, *.xml (OpenVINO; its .bin beside it) or *.pt (TorchScript)")
    p.add_argument("--stride", type=int, default=None,
                   help=f"patch-level models: stride of the dense scoring inside the graph; default (None): the "
                        f"stride its threshold was calibrated at ({PATCH_SCORE_STRIDE} for models of this code)")
    return p
