"""Self-describing checkpoints (weights, config, category, density, code version), loaded strictly, weights_only.

Also here: the one atomic write, the one scan of a checkpoint folder, and torchvision's ImageNet weights read from
its cache (they cannot be fetched on every machine)."""
import contextlib
import datetime
import io
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
from pathlib import Path

import torch
from torchvision.models import get_model_weights

import density as density_lib
from config.paper import DEFAULT_ARCH
from model import IMAGENET_MEAN, IMAGENET_STD, ProjectionNet, head_layers
from support.errors import CutPasteError

# Bumped when the checkpoint layout changes in a way old readers cannot follow.
CHECKPOINT_FORMAT = 1
# Keys every checkpoint holds; a file without them is not one of ours.
CHECKPOINT_KEYS = ("format", "category", "config", "model", "state_dict", "density")
# How long a weights download may stall before a clear message instead of a hang on a machine without network.
DOWNLOAD_TIMEOUT_S = 20.0
# Seconds waited before each retry of a refused rename over an existing file: on Windows a file another program
# holds open (a spreadsheet showing the CSV, an antivirus scan) cannot be replaced until it lets go.
REPLACE_WAITS_S = (0.05, 0.1, 0.2, 0.4, 0.8)
# Names Windows gives to devices, in any case and with any extension: a file "CON.csv" is the console, not a file.
RESERVED_NAMES = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|(COM|LPT)[0-9\u00b9\u00b2\u00b3])(\..*)?",
                            re.IGNORECASE)
# Characters no Windows file name may hold (':' also makes "C:x" a path relative to drive C's working folder).
NOT_IN_NAMES = '<>:"|?*/\\'


class FileInUse(CutPasteError, PermissionError):
    """A file that could not be replaced because another program holds it: one line for the user (a CutPasteError),
    and still the OSError that callers who keep going after a failed write catch."""


def atomic_write(path: Path, write, mode: str = "wb") -> None:
    """write(file) into a temporary file beside `path`, fsync, rename over `path`: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}  # the same bytes on every system
    try:
        with os.fdopen(fd, mode, **text) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; shared folders stay shared
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def replace(src, dst: Path) -> None:
    """os.replace(src, dst), retried for about 1.5 s while the system refuses it (Windows, where another program
    holds `dst` open); then FileInUse, naming the file."""
    for wait in (*REPLACE_WAITS_S, None):
        try:
            os.replace(src, dst)
            return
        except PermissionError as err:
            if wait is None:
                raise FileInUse(f"cannot replace {dst}: another program holds it open ({err.strerror or err}); "
                                f"close it there (a spreadsheet, a viewer) and rerun") from None
            time.sleep(wait)


def write_csv(frame, path: Path) -> None:
    """A pandas frame as CSV, atomically, rows ending in '\\n' (pandas ends them in os.linesep, '\\r\\n' on Windows)."""
    atomic_write(path, lambda fh: frame.to_csv(fh, index=False, lineterminator="\n"), "w")


def atomic_save(obj, path: Path) -> None:
    """torch.save into memory, then one plain write: a full disk raises OSError (ENOSPC), which torch.save's own
    writer turns into a RuntimeError that names no cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def same_folder(recorded: str, folder) -> bool:
    """Whether the path text `recorded` names `folder`: the same text, or the same folder on disk (spelled in
    another case on a case-insensitive disk, or reached through another drive letter on Windows)."""
    if recorded == str(folder):
        return True
    try:
        return os.path.samefile(recorded, folder)
    except (OSError, ValueError):  # one of them is gone, or not a path here
        return False


def writable_folder(folder: Path, flag: str) -> Path:
    """Create `folder` and prove a file can be written there, before any work whose results would go there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise CutPasteError(f"{flag} {folder} is not a writable folder ({err.strerror or err}); "
                            f"give one you can write to") from None
    return folder


def writable_file(path: Path, flag: str) -> Path:
    """`path` can be written as a file: not a folder, in a writable folder."""
    path = Path(path)
    if path.is_dir():
        raise CutPasteError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'predictions.csv'}")
    writable_folder(path.parent, flag)
    return path


def is_plain_name(value) -> bool:
    """One file name on every system: no separator, drive (C:x), device name (CON, NUL, COM1), control character,
    and no trailing dot or space, which Windows drops (so "lid." would be "lid")."""
    return (isinstance(value, str) and value not in ("", ".", "..") and not any(c in NOT_IN_NAMES for c in value)
            and all(ord(c) >= 32 for c in value) and value[-1] not in ". " and not RESERVED_NAMES.fullmatch(value))


def plain_name(value, what: str, path: Path) -> str:
    """A name read from a file, checked to be one plain path component: data never becomes a path."""
    if not is_plain_name(value):
        raise CutPasteError(f"{path} holds {what} {value!r}, which is not a plain name; it was not written by "
                            f"this project: remove it from the folder")
    return value


def code_version() -> str:
    """The git commit of this code (with '-dirty' when modified), or 'unknown' outside a checkout."""
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=True)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def weights_cache_path(weights) -> Path:
    """Where torchvision's loader keeps `weights`: <torch hub folder>/checkpoints/<the file name in its address>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weights.url).path)


def load_pretrained_state(weights) -> dict:
    """An ImageNet state dict through torchvision's own loader, which creates the cache folder, downloads once
    when the file is absent and checks the download's SHA-256 against the prefix in its name; a stalled download
    ends after DOWNLOAD_TIMEOUT_S with a clear message instead of a hang."""
    path = weights_cache_path(weights)
    cached = path.exists()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CutPasteError(pretrained_error(weights, path, cached, err)) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def pretrained_error(weights, path: Path, cached: bool, err: Exception) -> str:
    """The one-line message for a failure of load_pretrained_state: offline, a corrupt download, or a bad file."""
    if not cached and "invalid hash value" in str(err):  # torch.hub's words for a download that is not the file
        return (f"the download of {weights.url} does not have the SHA-256 its name promises ({err}); nothing was "
                f"kept in {path.parent}: retry, or train with --no-pretrained")
    if not cached and isinstance(err, (urllib.error.URLError, OSError, TimeoutError)):
        return (f"ImageNet weights are not cached at {path} and could not be downloaded ({err}); download "
                f"{weights.url} to that path (or set TORCH_HOME), or train with --no-pretrained")
    return f"cannot read ImageNet weights {path} ({type(err).__name__}: {str(err)[:200]}); delete it and retry"


def build_model(head_layer: int, num_classes: int, arch: str = DEFAULT_ARCH) -> ProjectionNet:
    try:
        return ProjectionNet(head_layers(head_layer), num_classes, arch)
    except ValueError as err:
        raise CutPasteError(f"--arch {arch}: {err}; give a torchvision classification model such as "
                            f"resnet18, resnet50 or efficientnet_b0 ... efficientnet_b4") from None


def load_imagenet_backbone(model: ProjectionNet) -> None:
    """torchvision's default ImageNet weights of the model's architecture, less the classifier, into the backbone."""
    state = load_pretrained_state(get_model_weights(model.arch).DEFAULT)
    state = {k: v for k, v in state.items() if not k.startswith(f"{model.classifier_name}.")}
    model.backbone.load_state_dict(state, strict=True)


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
    plain_name(ckpt["category"], "the category", path)  # eval and predict join it to --data_dir and --out_dir
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
