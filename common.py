"""Shared plumbing for the scripts: errors, device choice, seeding, atomic writes, weights.

Nothing here runs at import time.
"""
import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import tempfile
import urllib.error
import warnings
from pathlib import Path

import torch

# Bumped when the checkpoint layout changes in a way old readers cannot follow.
CHECKPOINT_FORMAT = 1
# How long a weights download may stall before we give up with a clear message
# instead of hanging on a machine without network.
DOWNLOAD_TIMEOUT_S = 20.0


# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
MALLOC_TRIM_THRESHOLD = 1 << 30
MALLOC_TOP_PAD = 64 << 20


class CutPasteError(Exception):
    """A user-facing error: bad input, missing files. Printed as one line, no traceback."""


def run_main(main):
    """Run an entry point; turn CutPasteError into a one-line message and exit code 2."""
    try:
        return main()
    except CutPasteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def resolve_device(device: str, cuda_flag: str | None = None) -> torch.device:
    """Pick the device: --device wins; the legacy --cuda 1 asks for CUDA and falls back with a warning."""
    if cuda_flag is not None and str(cuda_flag).lower() not in ("0", "false", "no", ""):
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("--cuda was given but CUDA is not available here; running on the CPU")
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CutPasteError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """True when bf16 autocast runs natively on this device (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast context on the device, or a no-op."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large CPU tensors from its heap and keep freed memory for reuse.

    By default glibc maps fresh pages for every allocation over its mmap threshold and unmaps them
    on free, so each training step faults in its activations page by page again. Without mmap and
    with a high trim threshold the pages stay mapped: the CPU training step ran about 15 % faster on
    the benchmark machine, for about 0.5 GB more resident memory (doc/performance.md). Returns
    False, changing nothing, where the C library has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # no process-wide C library handle, or no mallopt in it
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD), (_M_TOP_PAD, MALLOC_TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)


def seed_everything(seed: int) -> None:
    """Seed torch's global generators (weight init, dropout); augmentation has its own generator."""
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """The one random generator that drives data sampling and augmentation on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk mid-write leaves any previous file at `path` intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would, so shared folders stay shared.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def code_version() -> str:
    """The git commit of this code (with '-dirty' when modified), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here,
                             capture_output=True, text=True, timeout=5, check=True)
        return rev.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def weights_cache_path(weights) -> Path:
    """Where torchvision's weights API caches `weights` (a torchvision WeightsEnum member)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_pretrained_state(weights) -> dict:
    """ImageNet state dict through torchvision's weights API and its cache, failing clearly offline.

    A cached file is used as is; otherwise one download is tried with a timeout.
    """
    path = weights_cache_path(weights)
    if not path.exists():
        old_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            raise CutPasteError(
                f"ImageNet weights are not cached at {path} and could not be downloaded ({err}); "
                f"download {weights.url} to that path (or set TORCH_HOME), or train with --no-pretrained"
            ) from None
        finally:
            socket.setdefaulttimeout(old_timeout)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CutPasteError(f"cannot read ImageNet weights {path} ({err}); delete it and retry") from None
