"""Run records in each run folder (``<log_dir>/<run name>/``), beside the tensorboard events.

``args.json``: the sorted arguments; ``run.json``: per session (a resumed run has several) the code and library
versions, Python, platform, device and rank; ``scalars.jsonl``: ``{"step", "tag", "value", "wall_time"}`` per line."""
import datetime
import importlib.metadata
import json
import platform
import socket
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from storage.checkpoints import code_version, sorted_args

# Distributions whose versions decide the numbers a run produces.
RECORDED_LIBRARIES = ("torch", "torchvision", "numpy", "pillow", "scikit-learn", "scipy", "pandas",
                      "tensorboard", "tqdm")
SCALARS_FILE = "scalars.jsonl"
# Text files are UTF-8 with '\n' line ends on every system, so a run folder reads the same everywhere.
TEXT = {"encoding": "utf-8", "newline": "\n"}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment(device: torch.device, rank: int = 0, world_size: int = 1) -> dict:
    env = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "code_version": code_version(),
           "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
           "libraries": library_versions(), "device": str(device), "rank": rank, "world_size": world_size}
    if device.type == "cuda":
        env.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device))
    return env


def _keep_scalars_before(path: Path, step: int) -> None:
    """Drop scalars logged at or after `step`: a resumed run logs those steps again."""
    if path.exists():
        kept = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln)["step"] < step]
        path.write_text("".join(ln + "\n" for ln in kept), **TEXT)


class RunLog:
    """Tensorboard writer that also appends every scalar to scalars.jsonl and records the run.

    start_step > 0 marks a resumed run: the interrupted session's scalars from that step on are dropped from both
    logs (tensorboard's purge_step), so each step appears once."""

    def __init__(self, folder: Path, args, env: dict, start_step: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "args.json").write_text(json.dumps(sorted_args(args), indent=2), **TEXT)
        run_file = self.folder / "run.json"
        sessions = (json.loads(run_file.read_text(encoding="utf-8"))["sessions"]
                    if start_step > 0 and run_file.exists() else [])
        sessions.append({**env, "start_step": start_step})
        run_file.write_text(json.dumps({"sessions": sessions}, indent=2), **TEXT)
        _keep_scalars_before(self.folder / SCALARS_FILE, start_step)
        self.tb = SummaryWriter(str(self.folder), purge_step=start_step if start_step > 0 else None)
        self.jsonl = open(self.folder / SCALARS_FILE, "a", **TEXT)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        value = float(value)
        self.tb.add_scalar(tag, value, step)
        record = {"step": int(step), "tag": tag, "value": value, "wall_time": round(time.time(), 3)}
        self.jsonl.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        self.tb.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()


def read_scalars(folder: Path) -> list[dict]:
    path = Path(folder) / SCALARS_FILE
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
