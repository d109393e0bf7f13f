"""Where and how the network runs: device, bf16 autocast, memory format, allocator, generators, embedding."""
import contextlib
import ctypes
import os
import warnings

import torch

from common.errors import CutPasteError

# Images per forward pass when embedding for the density (no gradients, so it can be large).
EMBED_BATCH = 128
# glibc's mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
MALLOC_TRIM_THRESHOLD = 1 << 30
MALLOC_TOP_PAD = 64 << 20
# Set to 1 to run as a machine without native bf16 does (the test suite's float32 path on a bf16 CPU).
NO_BF16_ENV = "CUTPASTE_NO_BF16"


def resolve_device(device: str, cuda_flag: str | None = None) -> torch.device:
    """--device wins; the legacy --cuda 1 asks for CUDA and falls back to the CPU with a warning."""
    if cuda_flag is not None and str(cuda_flag).lower() not in ("0", "false", "no", ""):
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("--cuda was given but CUDA is not available here; running on the CPU")
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                            else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CutPasteError(f"--device {device} asked for CUDA, but torch sees no GPU; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CutPasteError(f"--device {device} asked for an Apple GPU (MPS), but torch sees none (it needs Apple "
                            f"silicon, a recent macOS and a torch built with MPS); use --device cpu")
    return dev


def bf16_supported(device: torch.device) -> bool:
    """True where bf16 runs natively: CUDA with bf16, or a CPU with AVX512-BF16 or AMX (unless CUTPASTE_NO_BF16=1).
    Not on Apple GPUs (MPS): the host CPU's flags say nothing of them, and torch offers bf16 there only from
    macOS 14, so the default stays float32 (--amp asks for bf16)."""
    if os.environ.get(NO_BF16_ENV, "") == "1" or device.type == "mps":
        return False
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def choose(args, device: torch.device) -> None:
    """Training's settings: fill args.amp and args.channels_last where None (auto) for `device`; on the CPU keep
    freed memory if asked. bf16 where native; channels-last on CUDA and with bf16 (oneDNN's blocked kernels), NCHW
    for the float32 training step on a CPU, where neither format wins on every CPU (doc/performance.md).
    Inference chooses apart (inference.choose)."""
    if args.amp is None:
        args.amp = bf16_supported(device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda" or args.amp
    if device.type == "cpu" and getattr(args, "keep_freed_memory", False):
        keep_freed_memory()


def describe(device: torch.device, amp: bool, channels_last: bool) -> str:
    """'cpu (AVX2, 2 threads), float32, NCHW': the settings a run goes with, for its start-up line."""
    where = str(device)
    if device.type == "cpu":
        where += f" ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    elif device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    return f"{where}, {'bf16 autocast' if amp else 'float32'}, {'channels-last' if channels_last else 'NCHW'}"


def synchronizer(device: torch.device):
    """A call that waits for the work queued on `device` (CUDA, MPS), so that a timing measures the work itself."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next step instead of unmapping it; False without glibc.

    Otherwise every CPU step faults its activations in again (doc/performance.md has the gain); costs about
    0.5 GB resident."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # no process-wide C library handle, or no mallopt in it
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD), (_M_TOP_PAD, MALLOC_TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@torch.inference_mode()
def embed_images(model, images_u8: torch.Tensor, device: torch.device, amp: bool, channels_last: bool,
                 batch: int = EMBED_BATCH) -> torch.Tensor:
    """(N, 3, H, W) uint8 images (any device) -> (N, D) float32 embeddings on `device`; the model's mode is kept."""
    was_training = model.training
    model.eval()
    fmt = memory_format(channels_last)
    out = []
    for start in range(0, images_u8.shape[0], batch):
        x = images_u8[start:start + batch].to(device, non_blocking=True).float().div_(255)
        with autocast(device, amp):
            out.append(model.embed(x.contiguous(memory_format=fmt)).float())
    model.train(was_training)
    return torch.cat(out)
