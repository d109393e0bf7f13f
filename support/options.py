"""Command-line flags, each declared once and shared through argparse's `parents=` (as DINO does).

This module imports nothing heavy, so that every script's --help answers at once: the scripts
import torch only after their arguments are parsed. The paper's values (Li et al., CVPR 2021,
sections 3 and 4) are the named constants below; each flag's help gives the default and the
paper's value.
"""
import argparse
from pathlib import Path

# Section 4.1: 256 px images, 32 clean images per step (64 with their augmented copies), SGD at 0.03, ResNet18.
PAPER_SIZE = 256
PAPER_BATCH_SIZE = 32
PAPER_LR = 0.03
DEFAULT_ARCH = "resnet18"
# Steps per "epoch": Li et al. count 256 optimizer steps as one epoch, and --epochs counts steps.
STEPS_PER_EPOCH = 256
VARIANTS = ("normal", "scar", "union", "3way")
# Section 4.2: 64 px patches of 256 px images, scored densely at stride 4.
PAPER_PATCH_SIZE = 64
PAPER_STRIDE = 4
# ResNet18 downsamples 32x: a smaller patch shrinks to one pixel before its last block.
MIN_PATCH_SIZE = 32
# Location cells of the patch Gaussians (13 x 13 for 64 px patches of 256 px images).
CELL_STRIDE = 16
PATCH_BATCH = 512
# Stride of the dense scoring of a patch-level model in predict.py and its exports; training scores its held-out
# clean images at this stride for the threshold. A quarter of the paper's 64 px patch: 169 patches per 256 px image,
# 1/14 of the paper's stride 4, so that the calibration costs training minutes on a CPU, not tens of minutes.
PATCH_SCORE_STRIDE = 16
LOCALIZATION_MODES = ("auto", "none", "dense", "gradcam")
PATCH_DENSITIES = ("auto", "shared", "local")
GRADCAM_TARGETS = ("density", "logit")
# --density: the Gaussian stored in the checkpoint, or one refitted by the named estimator (density.py).
CHECKPOINT_DENSITY = "checkpoint"
DENSITY_ESTIMATORS = ("torch", "sklearn")
# The threshold of predict.py: this quantile of the held-out clean training scores (about 1 % false alarms).
DEFAULT_QUANTILE = 0.99
PREDICT_BATCH = 64
EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
# reproduce.py's figures: the earlier reimplementation's bar charts start the AUROC axis at 40 %, so that differences
# between 90 and 100 stay readable; the training curves are moving averages of this many logged points.
FIGURES_Y_MIN = 40.0
FIGURES_WINDOW = 10
# --layout: the folder layouts dataset.py reads; auto detects them.
LAYOUTS = ("auto", "mvtec", "mvtec2", "loco", "visa", "folder")


DOC = Path(__file__).resolve().parents[1] / "doc"
PAPER_TABLE1 = DOC / "paper_table1.csv"  # Li et al., Table 1: image AUROC per category and variant
PAPER_TABLE2 = DOC / "paper_table2.csv"  # Li et al., Table 2: pixel AUROC per category


def _parser(description: str | None = None, parents=()) -> argparse.ArgumentParser:
    if description is None:  # a parent: its flags are added to a script's parser, which owns --help
        return argparse.ArgumentParser(add_help=False)
    return argparse.ArgumentParser(description=description, parents=list(parents),
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")


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
                        "AVX512-BF16 or AMX)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format; default (None): on with CUDA or bf16, where it is faster, "
                        "off for float32 on a CPU, where neither wins everywhere (doc/performance.md)")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images (0: the main thread)")
    p.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, have glibc's malloc keep freed memory for the next batch instead of mapping "
                        "fresh pages (faster steps for about 0.5 GB more memory)")
    return p


def speed_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap the training model in torch.compile")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each step's augmentation from a CUDA graph (one launch instead of about "
                        "1300); ignored on other devices")
    return p


def model_flags() -> argparse.ArgumentParser:
    """What a model is: the settings a resumed or skipped run must share (runstate.RUN_KEYS)."""
    p = _parser()
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
    """run_training.py's flags (reproduce.py builds its runs' arguments with the same parser)."""
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


def eval_flags() -> argparse.ArgumentParser:
    p = _parser()
    p.add_argument("--model_dir", type=Path, default=Path("models"), help="folder of checkpoints (*.tch)")
    p.add_argument("--out_dir", type=Path, default=Path("Eval"),
                   help="plots and tables go to out_dir/<model_dir name>")
    p.add_argument("--density", type=str, choices=(CHECKPOINT_DENSITY, *DENSITY_ESTIMATORS),
                   default=CHECKPOINT_DENSITY,
                   help="Gaussian of the embeddings (section 3.3): the one stored in the checkpoint, or refit on "
                        "--data_dir's training images with torch or sklearn (both Ledoit-Wolf)")
    p.add_argument("--save_plots", type=int, choices=(0, 1), default=1, help="1 writes ROC, histogram, t-SNE plots")
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
    """eval.py's flags (reproduce.py evaluates its runs with the same parser)."""
    return _parser(description, [data_flags(), eval_flags(), localization_flags(), runtime_flags()])


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
