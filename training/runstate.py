"""Surviving interruptions: periodic training states, --resume, Ctrl-C, and finished categories.

A training state (``<model_dir>/<category>.state.pt``) holds weights, optimizer, scheduler, step and the generator's
and torch's random states, written atomically (files.atomic_save). On the CPU with a fixed seed a resumed run
ends bit-identical to an uninterrupted one."""
import contextlib
import signal
import sys
import threading
import warnings
from pathlib import Path

import filelock
import torch

from common.errors import CutPasteError
from storage.checkpoints import code_version, scan
from storage.files import atomic_save, plain_name

# Bumped when the state layout changes in a way old readers cannot follow.
STATE_FORMAT = 1
STATE_KIND = "cutpaste-training-state"
# The settings that make two trainings of a category the same run: with others a state is not continued, nor a
# checkpoint counted as finished.
RUN_KEYS = ("variant", "epochs", "batch_size", "lr", "optim", "arch", "pretrained", "freeze_resnet", "head_layer",
            "size", "patch_size", "seed")


class Interrupted(Exception):
    """Training stopped on request (Ctrl-C or SIGTERM) after saving its state."""


def state_path(model_dir: Path, category: str) -> Path:
    return Path(model_dir) / f"{category}.state.pt"


def run_config(args) -> dict:
    return {key: getattr(args, key) for key in RUN_KEYS}


def config_differences(saved: dict, args) -> list[str]:
    """'--key saved (now current)' for each run setting that differs from `args`."""
    return [f"--{key} {saved.get(key)!r} (now {getattr(args, key)!r})" for key in RUN_KEYS
            if saved.get(key) != getattr(args, key)]


def capture(step: int, run_name: str, category: str, args, model, opt, sched, gen: torch.Generator,
            device: torch.device) -> dict:
    """Everything needed to continue training after `step` completed steps."""
    return {
        "kind": STATE_KIND, "format": STATE_FORMAT, "code_version": code_version(), "category": category,
        "run_name": run_name, "step": step, "config": run_config(args), "device_type": device.type,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def save_state(state: dict, path: Path) -> bool:
    """Write the state atomically; on an OS error (full disk) warn, keep the previous state, return False."""
    try:
        atomic_save(state, path)
    except OSError as err:
        warnings.warn(f"could not save the training state {path} ({err}); the previous state is intact "
                      f"and training goes on")
        return False
    return True


def load_state(path: Path, args) -> dict | None:
    """The saved state for this run, validated against `args`; None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    fix = f"delete {path} to start over, or drop --resume"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CutPasteError(f"cannot read training state {path} ({type(err).__name__}: {str(err)[:160]}); "
                            f"it may be truncated: {fix}") from None
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise CutPasteError(f"{path} is not a training state of this project; {fix}")
    if state.get("format") != STATE_FORMAT:
        raise CutPasteError(f"{path} has state format {state.get('format')}, this code reads {STATE_FORMAT}; {fix}")
    plain_name(state.get("run_name"), "the run name", path)  # it names the run's log folder
    diffs = config_differences(state["config"], args)
    if diffs:
        raise CutPasteError(f"{path} was saved by a run with other settings: {', '.join(diffs)}; "
                            f"rerun with that run's settings, or {fix}")
    return state


def restore(state: dict, path: Path, model, opt, sched, gen: torch.Generator, device: torch.device) -> int:
    """Load a validated state into the freshly built training objects; return the step to continue from."""
    if state["device_type"] != device.type:
        raise CutPasteError(f"{path} was saved on {state['device_type']}, this run is on {device.type}; "
                            f"resume with --device {state['device_type']}, or delete it to start over")
    try:
        model.load_state_dict(state["model"], strict=True)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CutPasteError(f"{path} does not fit this model ({str(err).splitlines()[0][:160]}); "
                            f"delete it to start over") from None
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return int(state["step"])


@contextlib.contextmanager
def category_lock(model_dir: Path, category: str):
    """Hold <model_dir>/<category>.lock while the category trains: two trainings of it into one folder would share
    its state file. The lock is the system's (flock, or Windows' own locking, through filelock), so it is dropped
    when the process ends, however it ends."""
    path = Path(model_dir) / f"{category}.lock"  # training.run has made the folder and checked it writable
    lock = filelock.FileLock(path)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise CutPasteError(f"another training of {category} is writing into {model_dir} (it holds {path}); "
                            f"wait for it to end, or give this one another --model_dir") from None
    try:
        yield
    finally:
        lock.release()


def finished_checkpoints(model_dir: Path, args) -> dict[str, Path]:
    """Per category, the newest checkpoint in `model_dir` made with this run's settings."""
    found = {}
    for category, items in scan(model_dir).items():
        same = [path for path, ckpt in items if not config_differences(ckpt["config"], args)]
        if same:
            found[category] = same[-1]
    return found


def stop_signals() -> tuple[int, ...]:
    """Ctrl-C (SIGINT), SIGTERM, and where the system has it Ctrl-Break (SIGBREAK, Windows' other console stop key;
    Windows itself never sends SIGTERM)."""
    return tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGBREAK") if hasattr(signal, name))


class StopRequest:
    """Turns the first Ctrl-C (SIGINT), SIGTERM or Ctrl-Break into a request the training loop polls between steps,
    to save and stop; a second signal aborts at once. Inert outside the main thread, where handlers cannot be
    installed."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: saving the training state after this step "
              f"(again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in stop_signals():
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
