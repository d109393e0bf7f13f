"""Throughput of augmentation, training step, end-to-end training and evaluation; peak memory; FLOP/s; and, in
the same run, of a reference built as the earlier reimplementation works (per-image PIL augmentation in DataLoader
workers, float32 NCHW), so speed-ups are ratios from one run.

    python tools/benchmark.py --data_dir ../shared/data/mvtec_bottle_256 --type bottle --out doc/benchmark_cpu.md
"""
import argparse
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules live one folder up

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision.transforms import v2 as T  # noqa: E402

import dataset  # noqa: E402
import density  # noqa: E402
from common.paper import PAPER_BATCH_SIZE, PAPER_SIZE, VARIANTS  # noqa: E402
from cutpaste import COLOR_JITTER, CUTPASTE_AREA_RATIO, CUTPASTE_ASPECT_RATIO, VARIANT_CLASSES  # noqa: E402
from cli import options  # noqa: E402
from evaluation import evaluate
from storage import checkpoints
from training import devices, loop
from common.errors import CutPasteError, run_main  # noqa: E402

# The earlier reimplementation's DataLoader: 8 workers (its --workers default), 5 batches prefetched per worker.
REFERENCE_WORKERS = 8
REFERENCE_PREFETCH = 5


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark training and evaluation throughput.",
                                parents=[options.runtime_flags(), options.speed_flags()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None, help="data root (none: random images, no eval)")
    options.add_layout_flag(p)
    p.add_argument("--type", type=str, default="bottle", help="category to load from --data_dir")
    p.add_argument("--size", type=int, default=PAPER_SIZE, help="image side in pixels")
    p.add_argument("--variant", type=str, choices=VARIANTS, default="normal", help="CutPaste variant")
    p.add_argument("--batch_size", type=int, default=PAPER_BATCH_SIZE, help="clean images per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (medians are kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True, help="also time the reference")
    p.add_argument("--ref_workers", type=int, default=REFERENCE_WORKERS, help="DataLoader workers of the reference")
    p.add_argument("--eval_repeats", type=int, default=3, help="evaluation timings are medians of this many runs")
    p.add_argument("--out", type=Path, default=None, help="also write the results as markdown to this file")
    return p


def timed_in_turn(fns, device, steps: int, warmup: int) -> list[float]:
    """Median seconds per call of each fn, called in turn so that a change of machine load hits all alike."""
    sync = devices.synchronizer(device)
    times = [[] for _ in fns]
    for call in range(warmup + steps):
        for fn, out in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if call >= warmup:
                out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def make_step(t, device, amp: bool, channels_last: bool, compiled: bool = False):
    """step(x, y): run_training.py's optimizer step on a fresh model, with these settings."""
    torch.manual_seed(t.seed)
    fmt = devices.memory_format(channels_last)
    model = checkpoints.build_model(t.head_layer, VARIANT_CLASSES[t.variant], t.arch).to(device, memory_format=fmt)
    stepped = torch.compile(model) if compiled else model
    opt, sched = loop.make_optimizer(model, t, 10 ** 6)
    return lambda x, y: loop.train_step(stepped, opt, sched, x.contiguous(memory_format=fmt), y, device, amp)


def bench_ours(args, t, images, device) -> dict:
    """Ours: augmentation; the model step as devices.choose sets it, in fp32 NCHW and (--compile) compiled; end to
    end; the step's FLOP/s."""
    batch = loop.batch_source(t, images, devices.make_generator(device, 0), device)
    x, y = batch()
    x_fmt = x.contiguous(memory_format=devices.memory_format(t.channels_last))
    step, plain = make_step(t, device, t.amp, t.channels_last), make_step(t, device, False, False)
    # once, outside the timing; neither bf16 nor a memory format changes what it counts
    with FlopCounterMode(display=False) as counter:
        plain(x, y)
    fns = {"ours: augmentation": batch, "ours: model step": lambda: step(x_fmt, y),
           "ours fp32 NCHW: model step": lambda: plain(x, y), "ours: end-to-end": lambda: step(*batch())}
    if args.compile:
        compiled = make_step(t, device, t.amp, t.channels_last, compiled=True)
        fns["ours compiled: model step"] = lambda: compiled(x_fmt, y)
    took = dict(zip(fns, timed_in_turn(list(fns.values()), device, args.steps, args.warmup)))
    rows = {f"{name} img/s": x.shape[0] / s for name, s in took.items()}
    model_s, gflop = took["ours: model step"], counter.get_total_flops() / 1e9
    rows["model step speed-up (ours' settings / fp32 NCHW)"] = took["ours fp32 NCHW: model step"] / model_s
    rows["ours: pipeline efficiency (model step / end-to-end time)"] = model_s / took["ours: end-to-end"]
    rows["ours: model step GFLOP (forward + backward)"] = gflop
    rows["ours: model step GFLOP/s"] = gflop / model_s
    return rows


class ReferenceCutPaste(Dataset):
    """The reference data path: PIL images, ColorJitter and CutPaste per image in PIL."""

    def __init__(self, images_u8: torch.Tensor, length: int):
        self.pil, self.length = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8], length
        self.jitter = T.ColorJitter(COLOR_JITTER, COLOR_JITTER, COLOR_JITTER, COLOR_JITTER)
        # The model normalises internally, so the reference stops at float tensors.
        self.to_tensor = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        img = self.jitter(self.pil[idx % len(self.pil)])
        w, h = img.size
        area = random.uniform(*CUTPASTE_AREA_RATIO) * w * h
        aspect = math.exp(random.uniform(*(math.log(r) for r in CUTPASTE_ASPECT_RATIO)))
        pw, ph = min(w, max(1, int((area * aspect) ** 0.5))), min(h, max(1, int((area / aspect) ** 0.5)))
        x0, y0 = random.randint(0, w - pw), random.randint(0, h - ph)
        patch = self.jitter(img.crop((x0, y0, x0 + pw, y0 + ph)))
        out = img.copy()
        out.paste(patch, (random.randint(0, w - pw), random.randint(0, h - ph)))
        return self.to_tensor(img), self.to_tensor(out)


def bench_reference(args, t, images, device) -> float:
    """The reference's seconds per step end to end: PIL CutPaste in DataLoader workers, float32 NCHW, 2 classes."""
    random.seed(0)  # with --ref_workers 0 the boxes are drawn in this process
    step = make_step(argparse.Namespace(**{**vars(t), "variant": "normal"}), device, False, False)
    calls, workers = args.steps + args.warmup, args.ref_workers
    batches = iter(DataLoader(ReferenceCutPaste(images.cpu(), calls * args.batch_size), batch_size=args.batch_size,
                              shuffle=True, num_workers=workers,
                              prefetch_factor=REFERENCE_PREFETCH if workers > 0 else None))

    def end_to_end():
        clean, aug = next(batches)
        step(torch.cat([clean, aug]).to(device), torch.arange(2, device=device).repeat_interleave(clean.shape[0]))

    return timed_in_turn([end_to_end], device, args.steps, args.warmup)[0]


def reference_eval(args, t, device) -> None:
    """The reference's evaluation: PIL decoding one by one, float32 NCHW, scikit-learn's LedoitWolf refitted."""
    model = checkpoints.build_model(t.head_layer, 2, t.arch).to(device).eval()
    tf = T.Compose([T.Resize((args.size, args.size)), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    embeds = []
    for paths in (dataset.list_train_images(args.data_dir, args.type, args.layout),
                  [it.path for it in dataset.list_test_items(args.data_dir, args.type, args.layout)]):
        with torch.no_grad():
            chunks = [torch.stack([tf(Image.open(p).convert("RGB")) for p in paths[i:i + 64]])
                      for i in range(0, len(paths), 64)]
            embeds.append(torch.cat([model.embed(x.to(device)) for x in chunks]).cpu())
    density.fit_and_score(embeds[0], embeds[1], "sklearn")


def run_command(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CutPasteError(f"{Path(cmd[1]).name} failed in the benchmark: {res.stderr.strip()[-500:]}")


def bench_eval(args, t, images, device) -> dict:
    """Seconds to evaluate the category (medians of --eval_repeats): ours in this process (no plots) and as the
    `python eval.py` command (plots on), and the reference."""
    with tempfile.TemporaryDirectory() as tmp:
        t = argparse.Namespace(**{**vars(t), "model_dir": Path(tmp) / "models"})
        torch.manual_seed(t.seed)  # untrained weights: evaluation takes as long whatever they are
        run = loop.Run(t, args.type, "model-benchmark", device, loop.prepare_model(t, device), *[None] * 3)
        loop.finish_category(run, images)
        flags = ["--data_dir", str(args.data_dir), "--type", args.type, "--layout", args.layout,
                 "--model_dir", str(t.model_dir), "--out_dir", str(Path(tmp) / "Eval"), "--device", str(device),
                 "--workers", str(args.workers), "--amp" if t.amp else "--no-amp",
                 "--channels_last" if t.channels_last else "--no-channels_last"]
        # The same settings as eval.py's arguments, without plots, for the in-process timing.
        same = {"data_dir": args.data_dir, "type": args.type, "layout": args.layout, "model_dir": t.model_dir,
                "out_dir": Path(tmp) / "Eval", "device": str(device), "workers": args.workers, "amp": t.amp,
                "channels_last": t.channels_last, "save_plots": 0}
        fns = {"ours: eval in-process s": lambda: evaluate.run(options.eval_args(**same)),
               "ours: eval command s (python eval.py, plots on)":
                   lambda: run_command([sys.executable, str(ROOT / "eval.py"), *flags])}
        if args.reference:
            fns["reference: eval in-process s"] = lambda: reference_eval(args, t, device)
        rows = dict(zip(fns, timed_in_turn(list(fns.values()), device, args.eval_repeats, 0)))
    if args.reference:
        rows["speed-up eval in-process (reference / ours)"] = \
            rows["reference: eval in-process s"] / rows["ours: eval in-process s"]
    return rows


def cpuinfo() -> dict:
    """The first processor's entries in /proc/cpuinfo."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity where the system has one (Linux), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def clock_text(info: dict) -> tuple[str, str]:
    """(text holding 'MHz: ...' lines, where it came from): /proc/cpuinfo, else lscpu where there is one (Linux
    kernels that give no clock in /proc/cpuinfo); empty elsewhere (macOS, Windows), so the peak is unknown."""
    if "cpu MHz" in info:
        return f"MHz: {info['cpu MHz']}", "/proc/cpuinfo 'cpu MHz'"
    if shutil.which("lscpu") is None:
        return "", "no clock known"
    return subprocess.run(["lscpu"], capture_output=True, text=True).stdout, "lscpu"


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB; NaN where the system does not say (Windows has no `resource`)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def machine_peak() -> tuple[float, str]:
    """The fp32 peak GFLOP/s of this process's cores and how it was found: 2 FMA units of 16 (AVX-512) or 8 (AVX2)
    lanes per core, 2 FLOP per FMA; 0 where the clock is unknown."""
    info = cpuinfo()
    smt = int(info.get("siblings", 1)) // max(1, int(info.get("cpu cores", 1)))  # hardware threads share a core
    cores = max(1, usable_cpus() // max(1, smt))
    text, source = clock_text(info)
    mhz = max((float(v) for k, _, v in (ln.partition(":") for ln in text.splitlines()) if "MHz" in k), default=0.0)
    lanes = 16 if "avx512f" in info.get("flags", "").split() else 8
    how = (f"{cores} cores x {mhz:.0f} MHz ({source}) x {4 * lanes} FLOP/cycle (2 FMA units x {lanes} fp32 lanes "
           f"({'avx512f' if lanes == 16 else 'AVX2'}) x 2 FLOP per FMA)")
    return cores * mhz * 4 * lanes / 1e3, how


def report(args, device, rows: dict) -> str:
    cpu, bf16 = cpuinfo().get("model name", "unknown CPU"), "yes" if devices.bf16_supported(device) else "no"
    lines = [f"# Benchmark: ours on {devices.describe(device, args.amp, args.channels_last)}", "",
             f"Machine: {cpu}, CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 native on {device}: "
             f"{bf16}, {torch.get_num_threads()} threads, torch {torch.__version__}", "",
             f"size {args.size}, variant {args.variant}, batch_size {args.batch_size} clean images per step; "
             f"medians of {args.steps} timed steps after {args.warmup} warm-up; img/s counts the model's whole batch",
             "", "| measurement | value |", "|---|---|"]
    for name, value in rows.items():
        if isinstance(value, float):  # below 1: four significant digits, else three decimals
            value = f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}"
        lines.append(f"| {name} | {value} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    args.warmup = max(1, args.warmup)  # so that compiling and first-call set-up are never timed
    device = devices.resolve_device(args.device, args.cuda)
    keep, args.keep_freed_memory = args.keep_freed_memory, False  # set after the reference has run (below)
    devices.choose(args, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    # run_training.py's optimizer, head and seed, with the benchmark's data and runtime settings.
    t = options.training_args(pretrained=False, **{name: getattr(args, name) for name in (
        "variant", "batch_size", "size", "amp", "channels_last", "cuda_graph", "workers")})
    images = (dataset.MVTecTrain(args.data_dir, args.type, args.size, args.workers, args.layout).images
              if args.data_dir else torch.randint(0, 256, (max(64, args.batch_size), 3, args.size, args.size),
                                                  dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
              ).to(device)
    # The reference trains first, with the C library's default allocator as the earlier code; the setting is global.
    ref = 2 * args.batch_size / bench_reference(args, t, images, device) if args.reference else None
    if device.type == "cpu" and keep:
        devices.keep_freed_memory()
    rows = bench_ours(args, t, images, device)
    if ref is not None:
        rows["reference: end-to-end img/s"] = ref
        rows["speed-up end-to-end (ours / reference)"] = rows["ours: end-to-end img/s"] / ref
    if device.type == "cpu":  # the peak is the CPU's, so it measures a step only where the CPU runs it
        peak, how = machine_peak()
        rows.update({"machine peak GFLOP/s": peak, "machine peak formula": how,
                     "ours: model step fraction of machine peak": rows["ours: model step GFLOP/s"] / peak
                     if peak else float("nan")})
    if args.data_dir is not None:
        rows.update(bench_eval(args, t, images, device))
    rows["peak RSS MiB"] = peak_rss_mib()
    if device.type == "cuda":
        rows["peak CUDA MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    publish(report(args, device, rows), args.out)
    return rows


def publish(text: str, out: Path | None) -> None:
    """Print a benchmark's markdown and, with --out, write it there too."""
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8", newline="\n")


if __name__ == "__main__":
    run_main(main)
