"""Self-describing checkpoints (weights, config, category, density, code version), loaded strictly, weights_only:
the schema, the model it rebuilds, its Gaussian and threshold calibration, and the scan of a checkpoint folder."""
import datetime
import os
import subprocess
from pathlib import Path

import torch

import density as density_lib
from common.errors import CutPasteError
from common.paper import DEFAULT_ARCH
from model import IMAGENET_MEAN, IMAGENET_STD, ProjectionNet, head_layers
from storage import files

# Bumped when the checkpoint layout changes in a way old readers cannot follow.
CHECKPOINT_FORMAT = 1
# Keys every checkpoint holds; a file without them is not one of ours.
CHECKPOINT_KEYS = ("format", "category", "config", "model", "state_dict", "density")


def code_version() -> str:
    """The git commit of this code (with '-dirty' when modified), or 'unknown' outside a checkout."""
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_model(head_layer: int, num_classes: int, arch: str = DEFAULT_ARCH) -> ProjectionNet:
    try:
        return ProjectionNet(head_layers(head_layer), num_classes, arch)
    except ValueError as err:
        raise CutPasteError(f"--arch {arch}: {err}; give a torchvision classification model such as "
                            f"resnet18, resnet50 or efficientnet_b0 ... efficientnet_b4") from None


def sorted_args(args) -> dict:
    """The arguments by name, paths as text: a checkpoint's config and a run's args.json."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())}


def make_checkpoint(model: ProjectionNet, args, category: str, steps: int, density, train_scores,
                    **extra) -> dict:
    return {
        "format": CHECKPOINT_FORMAT, "code_version": code_version(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "category": category, "variant": args.variant, "size": args.size,
        "patch_size": args.patch_size,  # 0: an image-level model; else trained on patches of this side
        "seed": args.seed, "steps": steps, "config": sorted_args(args),
        "model": {"arch": model.arch, "head_layer": args.head_layer, "head_dims": head_layers(args.head_layer),
                  "num_classes": model.out.out_features, "embed_dim": model.embed_dim},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "density": density.state_dict(),
        "train_scores": train_scores.detach().float().cpu(),
        **extra,
    }


def mapping_blocks_replacing() -> bool:
    """True on Windows, where a memory-mapped file cannot be replaced or deleted (a retrain, an atomic write over
    it) while any tensor read from it lives; elsewhere the mapping keeps the old file's data and the name moves on."""
    return os.name == "nt"


def read_checkpoint(path: Path) -> dict:
    try:
        # mmap: only the tensors used are read, so matching a category among many checkpoints is cheap.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=not mapping_blocks_replacing())
    except Exception as err:
        raise CutPasteError(f"cannot read checkpoint {path} ({type(err).__name__}: {str(err)[:200]}); "
                            f"it may be truncated or not a CutPaste checkpoint: retrain or remove it") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CutPasteError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)}); "
                            f"remove it from the model folder or retrain")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CutPasteError(f"{path} has checkpoint format {ckpt['format']}, this code reads {CHECKPOINT_FORMAT}; "
                            f"retrain it with this version")
    files.plain_name(ckpt["category"], "the category", path)  # eval and predict join it to --data_dir and --out_dir
    return ckpt


def scan(model_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """Every checkpoint in `model_dir` per category (the one stored inside each file), oldest first."""
    model_dir = Path(model_dir)
    found: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(model_dir.glob("*.tch"), key=str) if model_dir.is_dir() else []:
        ckpt = read_checkpoint(path)
        found.setdefault(ckpt["category"], []).append((path, ckpt))
    return {cat: sorted(items, key=lambda pc: (pc[1]["created"], pc[0].name)) for cat, items in found.items()}


def model_from_checkpoint(ckpt: dict, path: Path) -> ProjectionNet:
    layout = ckpt["model"]
    model = build_model(layout["head_layer"], layout["num_classes"], layout.get("arch", DEFAULT_ARCH))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CutPasteError(f"{path} does not match the model layout it declares ({first[:200]}); "
                            f"it was written by other code: retrain it") from None
    broken = next((k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not v.isfinite().all()), None)
    if broken is not None:
        raise CutPasteError(f"{path} holds NaN or infinite weights ({broken}), which would score every image NaN; "
                            f"retrain it")
    return model


def density_from_checkpoint(ckpt: dict, path: Path, device: torch.device,
                            patch_ok: bool = False) -> density_lib.GaussianDensityTorch:
    """The Gaussian fitted on the clean training embeddings at the end of training, on `device`; with `patch_ok`
    also a patch-level model's (shared) Gaussian of clean patch embeddings."""
    if ckpt.get("patch_size", 0) and not patch_ok:
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {ckpt['patch_size']}): it scores an image "
                            f"by the maximum of its anomaly map; evaluate it with eval.py --localization dense")
    state = ckpt["density"]
    mean, precision = state.get("mean"), state.get("precision")
    dim = ckpt["model"].get("embed_dim", None if mean is None else mean.shape[-1])
    if mean is None or tuple(mean.shape) != (dim,) or precision is None or tuple(precision.shape) != (dim, dim):
        raise CutPasteError(f"{path} holds no Gaussian of {dim}-d embeddings (written by other code); retrain it, "
                            f"or refit the Gaussian with eval.py --density torch")
    if not (torch.isfinite(mean).all() and torch.isfinite(precision).all()):
        raise CutPasteError(f"{path} holds a Gaussian with NaN or infinite values, which would score every image "
                            f"NaN; retrain it, or refit the Gaussian with eval.py --density torch")
    return density_lib.GaussianDensityTorch.from_state_dict(state, device)


def by_category(model_dir: Path, wanted: list[str] | None) -> dict[str, list[tuple[Path, dict]]]:
    """scan() of the `wanted` categories (None: all found); errors name the folder and the fix."""
    if not Path(model_dir).is_dir():
        raise CutPasteError(f"model folder {model_dir} does not exist; train first or pass --model_dir")
    found = scan(model_dir)
    if not found:
        raise CutPasteError(f"found 0 checkpoints (*.tch) in {model_dir}; train with run_training.py first")
    missing = [cat for cat in wanted or () if cat not in found]
    if missing:
        raise CutPasteError(f"no checkpoint for category {missing[0]!r} in {model_dir} "
                            f"(found: {', '.join(sorted(found))}); train it or drop it from --type")
    return {cat: found[cat] for cat in (wanted if wanted is not None else found)}


def newest(model_dir: Path, wanted: list[str] | None) -> dict[str, tuple[Path, dict]]:
    """The newest checkpoint of each `wanted` category in `model_dir` (with a note where there are several)."""
    chosen = {}
    for cat, candidates in by_category(model_dir, wanted).items():
        if len(candidates) > 1:
            print(f"note: {len(candidates)} checkpoints for {cat}; using the newest, {candidates[-1][0].name}")
        chosen[cat] = candidates[-1]
    return chosen


def calibration(ckpt: dict, stride: int) -> tuple[list[float], str]:
    """The clean training images' held-out scores (or their fallback) and what they are."""
    held = ckpt.get("heldout_scores")
    patch = ckpt.get("patch_size", 0)
    if held is not None and held.numel() > 0:
        if patch and int(ckpt.get("score_stride", 0)) != stride:
            return [], (f"none: the held-out map maxima were scored at stride {ckpt.get('score_stride')}, this "
                        f"run scores at {stride}")
        return held.float().tolist(), "held-out clean training " + ("map maxima" if patch else "scores")
    if patch:
        return [], "none: a patch-level checkpoint from older code, without held-out map maxima"
    return ckpt["train_scores"].float().tolist(), "in-sample clean training scores (older checkpoint)"
