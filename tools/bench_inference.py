"""Inference speed of the Scorer (scoring/scorer.py) per runtime and memory format, in one run on the same images:
images/s at --size (batch --batch) and at the dense maps' patch size (batch --patch_batch), seconds per image of a
dense map at --stride (--patch_density Gaussians; section 4.2), and, with --model_dir, the `python eval.py` command's
wall time. Timing does not depend on the weights: an untrained ResNet18 and random Gaussians are used.

    python tools/bench_inference.py --out doc/benchmark_inference_cpu.md
    python tools/bench_inference.py --device cuda --skip 256,patch
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # the project's modules live one folder up

import torch  # noqa: E402

import density as density_lib  # noqa: E402
from benchmark import cpuinfo, publish  # noqa: E402
from common import paper  # noqa: E402
from cli import options  # noqa: E402
from localization import patches
from scoring import inference
from storage import checkpoints
from common.errors import run_main  # noqa: E402
from training.devices import bf16_supported, resolve_device, synchronizer  # noqa: E402
from scoring.scorer import Scorer  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Time the scoring graph per runtime and memory format.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    options.add_device_flag(p)
    p.add_argument("--size", type=int, default=paper.PAPER_SIZE, help="image side in pixels (paper: 256)")
    p.add_argument("--batch", type=int, default=paper.PAPER_BATCH_SIZE, help="images per call at --size")
    p.add_argument("--patch_size", type=int, default=paper.PAPER_PATCH_SIZE, help="dense maps' patch side (paper: 64)")
    p.add_argument("--patch_batch", type=int, default=paper.PATCH_BATCH, help="patches per call at --patch_size")
    p.add_argument("--stride", type=int, default=paper.PAPER_STRIDE, help="dense map stride (paper: 4)")
    p.add_argument("--patch_density", type=str, choices=("shared", "local"), default="local",
                   help="dense maps: one Gaussian, or one per location cell (eval.py's choice for bottle)")
    p.add_argument("--iters", type=int, default=3, help="timed calls per measurement (medians are kept)")
    p.add_argument("--skip", type=str, default="", help="comma-separated measurements to leave out: 256, patch, dense")
    p.add_argument("--runtimes", type=str, default="", help="comma-separated rows to keep (default: all that run here)")
    p.add_argument("--model_dir", type=Path, default=None, help="also time `python eval.py` on these checkpoints")
    p.add_argument("--data_dir", type=Path, default=Path("Data"), help="with --model_dir: the data eval.py reads")
    p.add_argument("--out", type=Path, default=None, help="also write the table as markdown to this file")
    return p


def variants(device: torch.device) -> dict[str, tuple[list[str], inference.Settings]]:
    """Each row: (eval.py's flags for it, its settings). Exported runtimes run on the CPU only."""
    rows = {"eager NCHW float32": (["--runtime", "eager", "--no-amp", "--no-channels_last"],
                                   inference.Settings(device, "eager", False, False)),
            "eager channels-last float32": (["--runtime", "eager", "--no-amp", "--channels_last"],
                                            inference.Settings(device, "eager", False, True))}
    if bf16_supported(device):
        rows["eager channels-last bf16"] = (["--runtime", "eager", "--amp", "--channels_last"],
                                            inference.Settings(device, "eager", True, True))
    if device.type == "cpu":
        for name in ("onnxruntime", "openvino"):
            rows[f"{name} float32"] = (["--runtime", name], inference.Settings(device, name))
    return rows


def timed(fn, iters: int) -> float:
    """Median seconds of `iters` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eval_seconds(args, device: torch.device, flags: list[str]) -> float:
    """Wall time of `python eval.py` (no plots, no report) on --model_dir, its tables in a scratch folder."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(ROOT / "eval.py"), "--model_dir", str(args.model_dir), "--data_dir",
               str(args.data_dir), "--device", str(device), "--save_plots", "0", "--report", "0", "--out_dir", out,
               *flags]
        return timed(lambda: subprocess.run(cmd, check=True, capture_output=True), 1)


def scorers(args) -> dict:
    """The Scorers timed: whole images at --size and at --patch_size, and a dense map at --stride."""
    torch.manual_seed(0)
    model = checkpoints.build_model(1, 2).eval()
    dim, gen = model.embed_dim, torch.Generator().manual_seed(0)
    mean = density_lib.normalize(torch.randn(1, dim, generator=gen))
    cells = len(patches.patch_positions(args.size, args.patch_size, paper.CELL_STRIDE)) ** 2
    cell_of = patches.nearest_cells(args.size, args.size, args.patch_size, args.stride, paper.CELL_STRIDE)
    local = args.patch_density == "local"
    gaussians = cells if local else 1
    return {"256": Scorer(model, mean, torch.eye(dim), args.size),
            "patch": Scorer(model, mean, torch.eye(dim), args.patch_size),
            "dense": Scorer(model, mean.expand(gaussians, dim), torch.eye(dim).expand(gaussians, dim, dim), args.size,
                            args.patch_size, args.stride, cell_of if local else None, args.patch_batch)}


def measure(args, device: torch.device) -> list[dict]:
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    keep = {s.strip() for s in args.runtimes.split(",") if s.strip()}
    batches = {"256": inference.example_batch(args.size, args.batch),
               "patch": inference.example_batch(args.patch_size, args.patch_batch),
               "dense": inference.example_batch(args.size, 1)}
    sync = synchronizer(device)
    rows = []
    for name, (flags, settings) in variants(device).items():
        if keep and name not in keep:
            continue
        row = {"runtime": name}
        for what, scorer in scorers(args).items():
            if what in skip:
                continue
            start = time.perf_counter()
            run = inference.runner(scorer, settings, batch=len(batches[what]))
            row[f"{what}: start s"] = time.perf_counter() - start
            seconds = timed(lambda: (run(batches[what]), sync()), args.iters)
            row[f"{what}: images/s" if what != "dense" else "dense: s per image"] = \
                seconds if what == "dense" else len(batches[what]) / seconds
        if args.model_dir is not None:
            row["eval.py command s"] = eval_seconds(args, device, flags)
        rows.append(row)
        print(row, flush=True)
    return rows


def report(args, device: torch.device, rows: list[dict]) -> str:
    info = cpuinfo()
    flags = set(info.get("flags", "").split())
    has = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else info.get("model name", "unknown CPU")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"# Scoring graph per runtime and memory format ({device.type})", "",
             f"Machine: {where} ({has}), {torch.get_num_threads()} threads; torch {torch.__version__}.", "",
             f"Medians of {args.iters} calls after a warm-up, uint8 images in, scores (dense: the {args.size} px map) "
             f"out. 256: {args.batch} images of {args.size} px per call; patch: {args.patch_batch} images of "
             f"{args.patch_size} px per call (the dense maps' patches); dense: one {args.size} px image, "
             f"{args.patch_size} px patches at stride {args.stride}, {args.patch_density} Gaussians; start s: "
             f"building the runner (an exported runtime exports the graph). Written by tools/bench_inference.py.", "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row.get(k), float) else str(row.get(k, "–"))
                                       for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    rows = measure(args, device)
    publish(report(args, device, rows), args.out)
    return rows


if __name__ == "__main__":
    run_main(main)
