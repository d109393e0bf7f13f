"""Throughput benchmark: augmentation, training step, end-to-end training, evaluation, peak memory.

Measures this project's pipeline and, in the same run, a reference pipeline built the way the
earlier PyTorch reimplementation works (per-image PIL CutPaste in DataLoader workers, float32,
NCHW; per-image PIL loading for evaluation), so the speed-ups are ratios from one run.

    python benchmark.py --data_dir ../shared/data/mvtec_bottle_256 --type bottle --out doc/benchmark_cpu.md
"""
import argparse
import math
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

import cudagraphs
import dataset
import engine
import eval as eval_script
import prefetch
import run_training
from common import (CutPasteError, bf16_supported, keep_freed_memory, make_generator, resolve_device, run_main,
                    seed_everything)
from cutpaste import (CUTPASTE_AREA_RATIO, CUTPASTE_ASPECT_RATIO, COLOR_JITTER, VARIANT_CLASSES, VARIANTS,
                     make_batch)


# The earlier reimplementation's DataLoader: 8 workers (its --workers default), 5 batches prefetched per worker.
REFERENCE_WORKERS = 8
REFERENCE_PREFETCH = 5
# Confidence of the interval around the seed-paired mean AUROC difference.
PAIRED_CONFIDENCE = 0.95
# Below this spread of the paired differences (e.g. runs too short to differ) no t-test is reported.
PAIRED_MIN_SD = 1e-9
# "No loss of AUROC" is tested as non-inferiority: a loss of this much or more is what the one-sided paired t-test
# rejects. One AUROC point: below the seed-to-seed spread of a single 100-step run on bottle (sd about 0.6 point for
# each pipeline, doc/benchmark_auroc_cpu.md), so a smaller loss would be lost in the noise of one rerun.
AUROC_MARGIN = 0.01


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark training and evaluation throughput.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None,
                   help="MVTec-layout root; without it, random images are used and evaluation is skipped")
    p.add_argument("--type", type=str, default="bottle", help="category to load from --data_dir")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--variant", type=str, choices=VARIANTS, default="normal", help="CutPaste variant")
    p.add_argument("--batch_size", type=int, default=32, help="clean images per step")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per measurement (model-only and end-to-end steps alternate; medians are kept)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the reference pipeline (per-image PIL, float32, NCHW) and train it for "
                        "--auroc_steps")
    p.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on the CPU, time ours with glibc's malloc keeping freed memory, as run_training.py does by "
                        "default (set after the reference is timed, which runs as the earlier code did)")
    p.add_argument("--ref_workers", type=int, default=REFERENCE_WORKERS,
                   help="DataLoader workers of the reference pipeline (the earlier reimplementation's default)")
    p.add_argument("--eval_repeats", type=int, default=3,
                   help="evaluation timings (ours, the eval.py command, the reference) are medians of this many runs")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also measure the model step under torch.compile")
    p.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay ours' augmentation from a CUDA graph, as run_training.py does by default; "
                        "the eager augmentation is then measured too (default: on)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="make ours' batches one step ahead as run_training.py does, on CUDA on a second stream "
                        "during the step; on CUDA the step without it is then measured too (default: on)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="measure throughput and evaluation time (--no-timing with --auroc_steps: AUROC only)")
    p.add_argument("--auroc_steps", type=int, default=0,
                   help="also train ours and the reference this many steps (variant normal, run_training.py's "
                        "defaults) from each --auroc_seeds seed and report both test image AUROCs; 0 skips")
    p.add_argument("--reference_our_step", action=argparse.BooleanOptionalAction, default=False,
                   help="with --auroc_steps, also train the reference's augmentation with our step (bf16 autocast "
                        "where native, channels-last) from the same seeds and batches, to tell the augmentation's "
                        "effect on the AUROC from the step's")
    p.add_argument("--auroc_seeds", type=str, default="0", help="comma-separated seeds of the --auroc_steps runs")
    p.add_argument("--auroc_margin", type=float, default=AUROC_MARGIN,
                   help="with two seeds or more, test each paired comparison for a loss of at least this much AUROC "
                        "(one-sided paired t-test, non-inferiority)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images")
    p.add_argument("--out", type=Path, default=None, help="also write the results as markdown to this file")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps: int, warmup: int) -> float:
    """Seconds per call of fn, after warm-up calls, with the device synchronised around the timing."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def timed_alternating(fn_a, fn_b, device, steps: int, warmup: int) -> tuple[tuple[float, float], ...]:
    """Median seconds per call of fn_a and of fn_b, called in turn so that a change of machine load hits both
    alike; each call is timed on its own, the device synchronised around it. For each, (seconds, host seconds):
    the host's are until the call returns, before the device is waited for. On an accelerator, host seconds
    close to the seconds mean the host launching the work is the bottleneck, not the device."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times = ([], [])
    for _ in range(steps):
        for fn, out in zip((fn_a, fn_b), times):
            sync(device)
            start = time.perf_counter()
            fn()
            host = time.perf_counter() - start
            sync(device)
            out.append((time.perf_counter() - start, host))
    return tuple((statistics.median(t for t, _ in out), statistics.median(h for _, h in out)) for out in times)


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn) -> int:
    """How many aten operations one call of fn dispatches, views included. On an accelerator each is a kernel launch
    or a view that the host pays for whatever the image size, so this counts what bounds a small step there."""
    with OpCounter() as counter:
        fn()
    return counter.count


class ReferenceCutPaste(Dataset):
    """The reference data path: decode-free PIL images, ColorJitter and CutPaste per image in PIL."""

    def __init__(self, images_u8: torch.Tensor, length: int):
        self.pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images_u8]
        self.length = length
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


def bench_ours(args, images_u8, device, amp: bool, channels_last: bool, compile_model: bool,
               cuda_graph: bool, prefetched: bool) -> dict:
    """Augmentation, model-only step and end-to-end step of this project's pipeline (img/s of the model's batch).

    The aten operations are counted on the eager augmentation: a CUDA graph replays them in one launch."""
    seed_everything(0)
    gen = make_generator(device, 0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    defaults = training_defaults()
    model = engine.build_model(defaults.head_layer, VARIANT_CLASSES[args.variant]).to(device, memory_format=fmt)
    step_model = torch.compile(model) if compile_model else model
    opt, sched = run_training.make_optimizer(model, defaults, 10 ** 6)

    def make():
        return make_batch(images_u8, args.variant, args.batch_size, gen)

    x, y = make()
    n = x.shape[0]
    batch = cudagraphs.GraphedCall(make, device, (gen,), cuda_graph)
    aug = timed(batch, device, args.steps, args.warmup)
    x_fmt = x.contiguous(memory_format=fmt)
    feed = prefetch.Prefetcher(batch, device, gen, prefetched)

    def end_to_end():
        xb, yb = feed()
        return run_training.train_step(step_model, opt, sched, xb.contiguous(memory_format=fmt), yb, device, amp)

    (model_only, model_host), (e2e, e2e_host) = timed_alternating(
        lambda: run_training.train_step(step_model, opt, sched, x_fmt, y, device, amp), end_to_end, device,
        args.steps, args.warmup)
    rows = {"augmentation img/s": n / aug, "model step img/s": n / model_only, "end-to-end img/s": n / e2e,
            "pipeline efficiency": model_only / e2e, "end-to-end s/step": e2e,
            "augmentation aten ops per step": dispatched_ops(make)}
    if device.type != "cpu":  # on the CPU the host does the work, so its time is the step's
        rows.update({"model step host s (launching)": model_host, "end-to-end host s/step (launching)": e2e_host})
    return rows


def reference_loader(images_u8: torch.Tensor, batch_size: int, steps: int, workers: int) -> DataLoader:
    """Batches of (clean, CutPaste) images from the reference pipeline, enough for `steps` steps."""
    return DataLoader(ReferenceCutPaste(images_u8.cpu(), steps * batch_size), batch_size=batch_size, shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=REFERENCE_PREFETCH if workers > 0 else None)


def reference_batch(clean: torch.Tensor, aug: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (x, y): clean images labelled 0, then their CutPaste versions labelled 1."""
    return torch.cat([clean, aug]).to(device), torch.arange(2, device=device).repeat_interleave(clean.shape[0])


def bench_reference(args, images_u8, device) -> dict:
    """The reference: PIL CutPaste per image in DataLoader workers, float32 NCHW (variant normal)."""
    seed_everything(0)
    defaults = training_defaults()
    model = engine.build_model(defaults.head_layer, 2).to(device)
    opt, sched = run_training.make_optimizer(model, defaults, 10 ** 6)
    it = iter(reference_loader(images_u8, args.batch_size, args.steps + args.warmup, args.ref_workers))

    def end_to_end():
        xb, yb = reference_batch(*next(it), device)
        return run_training.train_step(model, opt, sched, xb, yb, device, False)

    e2e = timed(end_to_end, device, args.steps, args.warmup)
    return {"end-to-end img/s": 2 * args.batch_size / e2e, "end-to-end s/step": e2e}


def training_defaults() -> argparse.Namespace:
    """run_training.py's defaults (head, optimizer, learning rate), so the benchmark trains as the script does."""
    return run_training.get_args_parser().parse_args([])


def trained_auroc(args, images_u8, test_set, device, seed: int, name: str, reference: bool, our_step: bool) -> float:
    """Test image AUROC of pipeline `name` after --auroc_steps steps (variant normal) from `seed`, the Gaussian
    fitted on the clean training images as at the end of training. The augmentation is ours (batched on the device)
    or, with `reference`, the reference's (PIL workers); the step is ours (bf16 autocast where native,
    channels-last) with `our_step`, else the reference's (float32, NCHW). The same seed gives the same initial
    weights, and the same batches for the same augmentation."""
    seed_everything(seed)
    # The reference draws its boxes from Python's random. DataLoader workers seed it from torch's generator, but
    # with --ref_workers 0 the draws happen in this process, so they are seeded here.
    random.seed(seed)
    defaults = training_defaults()
    defaults.amp = amp = our_step and bf16_supported(device)
    defaults.channels_last = our_step
    fmt = torch.channels_last if defaults.channels_last else torch.contiguous_format
    model = engine.build_model(defaults.head_layer, 2).to(device, memory_format=fmt)
    opt, sched = run_training.make_optimizer(model, defaults, args.auroc_steps)
    if reference:
        batches = (reference_batch(clean, aug, device)
                   for clean, aug in reference_loader(images_u8, args.batch_size, args.auroc_steps, args.ref_workers))
    else:
        gen = make_generator(device, seed)
        batches = (make_batch(images_u8, "normal", args.batch_size, gen) for _ in range(args.auroc_steps))
    for x, y in tqdm(batches, total=args.auroc_steps, desc=f"{name}, seed {seed}"):
        run_training.train_step(model, opt, sched, x.contiguous(memory_format=fmt), y, device, amp)
    return run_training.test_auroc(model, images_u8, test_set, device, defaults)


def auroc_rows(args, images_u8, device) -> dict:
    """--auroc_steps: ours and (unless --no-reference) the reference, and with --reference_our_step the reference's
    augmentation with our step, trained from the same seeds; their test image AUROCs and means."""
    if args.data_dir is None:
        raise CutPasteError("--auroc_steps needs --data_dir (the category's test set scores the models)")
    if not args.auroc_margin > 0:
        raise CutPasteError(f"--auroc_margin must be a positive AUROC loss, got {args.auroc_margin}; "
                            f"the default is {AUROC_MARGIN} (one point)")
    seeds = [int(s) for s in args.auroc_seeds.split(",") if s.strip()]
    test_set = dataset.MVTecTest(args.data_dir, args.type, args.size, args.workers)
    rows, scores = {}, {}
    pipelines = [("ours", False, True)]  # (name, the reference's augmentation, our step)
    if args.reference:
        pipelines.append(("reference", True, False))
        if args.reference_our_step:
            pipelines.append(("reference augmentation, our step", True, True))
    for name, reference, our_step in pipelines:
        scores[name] = [trained_auroc(args, images_u8, test_set, device, seed, name, reference, our_step)
                        for seed in seeds]
        rows.update({f"{name}: image AUROC after {args.auroc_steps} steps, seed {seed}": score
                     for seed, score in zip(seeds, scores[name])})
        rows[f"{name}: mean image AUROC over seeds {args.auroc_seeds}"] = statistics.mean(scores[name])
    # ours against the reference, and the split of that gap: the step alone (on the reference's own batches)
    # and the augmentation alone (with our step on both sides)
    for a, b in (("ours", "reference"), ("reference augmentation, our step", "reference"),
                 ("ours", "reference augmentation, our step")):
        if a in scores and b in scores:
            rows[f"AUROC difference ({a} - {b})"] = statistics.mean(scores[a]) - statistics.mean(scores[b])
            rows.update(paired_difference(scores[a], scores[b], label=f"{a} - {b}", margin=args.auroc_margin))
    return rows


def paired_difference(first: list[float], second: list[float], label: str = "ours - reference",
                      margin: float = AUROC_MARGIN) -> dict:
    """Seed-paired AUROC differences (first - second) as rows named after `label`: their spread, a paired t-test and
    its 95 % interval for the mean difference, and a non-inferiority test: the one-sided paired t-test of
    H0 mean <= -margin, whose rejection shows that first loses less than `margin` against second. Seed-to-seed
    spread is large at few steps, so one mean alone says little."""
    if len(first) < 2:
        return {}
    diffs = [a - b for a, b in zip(first, second)]
    sd = statistics.stdev(diffs)
    rows = {f"{label}: sd of the paired differences": sd,
            f"{label}: seeds with a difference >= 0": f"{sum(d >= 0 for d in diffs)} of {len(diffs)}"}
    if sd < PAIRED_MIN_SD:  # a t-test has no spread to use
        return rows
    test = stats.ttest_rel(first, second)
    low, high = test.confidence_interval(PAIRED_CONFIDENCE)
    loss = stats.ttest_1samp(diffs, popmean=-margin, alternative="greater")
    bound = float(loss.confidence_interval(PAIRED_CONFIDENCE).low)
    return {**rows, f"{label}: paired t statistic": float(test.statistic),
            f"{label}: paired t-test p-value": float(test.pvalue),
            f"{label}: mean difference, {PAIRED_CONFIDENCE:.0%} interval": f"[{low:.4f}, {high:.4f}]",
            f"{label}: one-sided {PAIRED_CONFIDENCE:.0%} lower bound of the mean difference": bound,
            f"{label}: p-value of a loss of {margin} or more": float(loss.pvalue),
            f"{label}: loss of {margin} or more excluded ({PAIRED_CONFIDENCE:.0%})": "yes" if bound > -margin else "no"}


def make_eval_checkpoint(args, model_dir: Path, device, amp: bool) -> Path:
    """A checkpoint of an untrained model, written as the end of training writes it (timing only)."""
    train_args = run_training.get_args_parser().parse_args(
        ["--type", args.type, "--size", str(args.size), "--no-pretrained", "--model_dir", str(model_dir)])
    train_args.amp = amp
    model = run_training.prepare_model(train_args, device)
    train = dataset.MVTecTrain(args.data_dir, args.type, args.size, args.workers)
    return run_training.finish_category(train_args, args.type, f"model-{args.type}-benchmark", model,
                                        train.images.to(device), device, False)


def run_command(cmd: list[str]) -> float:
    """Wall-clock seconds of a command; an error names it."""
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise CutPasteError(f"{' '.join(cmd[1:3])} failed in the benchmark: {res.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def median_of(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def bench_eval(args, device, amp: bool) -> dict:
    """Seconds to evaluate one category from a checkpoint with eval.py (medians of --eval_repeats): in this
    process (decode the test images, read the checkpoint, embed, score, AUROC, tables; no plots), as the whole
    command a user runs (a fresh Python process, default plots included), and that command's floor: Python
    starting, importing torch, torchvision, scikit-learn and the plotting stack, and exiting (eval.py --help)."""
    script = [sys.executable, str(Path(__file__).with_name("eval.py"))]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "models"
        make_eval_checkpoint(args, model_dir, device, amp)
        flags = ["--data_dir", str(args.data_dir), "--type", args.type, "--model_dir", str(model_dir),
                 "--out_dir", str(Path(tmp) / "Eval"), "--device", str(device), "--workers", str(args.workers)]
        in_process = median_of(lambda: timed(lambda: eval_script.main([*flags, "--save_plots", "0"]), device, 1, 0),
                               args.eval_repeats)
        command = median_of(lambda: run_command([*script, *flags]), args.eval_repeats)
    floor = median_of(lambda: run_command([*script, "--help"]), args.eval_repeats)
    return {"eval in-process s": in_process, "eval command s (python eval.py, plots on)": command,
            "eval command floor s (python eval.py --help)": floor}


def bench_reference_eval(args, device) -> dict:
    """Reference evaluation, as the earlier reimplementation evaluates: per-image PIL loading in a DataLoader (no
    workers), float32 NCHW, the clean training images embedded again and scikit-learn's LedoitWolf refitted."""
    model = engine.build_model(training_defaults().head_layer, 2).to(device).eval()
    tf = T.Compose([T.Resize((args.size, args.size)), T.ToImage(), T.ToDtype(torch.float32, scale=True)])

    class Files(Dataset):
        def __init__(self, paths):
            self.paths = paths

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return tf(Image.open(self.paths[i]).convert("RGB"))

    start = time.perf_counter()
    embeds = []
    for paths in (dataset.list_train_images(args.data_dir, args.type),
                  [it.path for it in dataset.list_test_items(args.data_dir, args.type)]):
        with torch.no_grad():
            embeds.append(torch.cat([model.embed(x.to(device)) for x in DataLoader(Files(paths), batch_size=64)]))
    engine.fit_and_score(embeds[0].cpu(), embeds[1].cpu(), "sklearn")
    return {"eval s": time.perf_counter() - start}


def peak_memory(device) -> dict:
    out = {"peak RSS MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak CUDA MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def load_images(args, device) -> torch.Tensor:
    if args.data_dir is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (max(64, args.batch_size), 3, args.size, args.size), generator=gen,
                             dtype=torch.uint8).to(device)
    return dataset.MVTecTrain(args.data_dir, args.type, args.size, args.workers).images.to(device)


def report(args, device, amp, rows: dict) -> str:
    lines = [f"# Benchmark ({device}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads)", "",
             f"size {args.size}, variant {args.variant if args.timing else 'normal'}, batch_size {args.batch_size} "
             f"clean images per step, "
             + (f"{args.steps} timed steps after {args.warmup} warm-up" if args.timing else
                f"{args.auroc_steps} training steps per AUROC run")
             + f"; ours with bf16 autocast {'on' if amp else 'off'}", "", "| measurement | value |", "|---|---|"]
    lines += [f"| {name} | {format_value(value)} |" for name, value in rows.items()]
    return "\n".join(lines) + "\n"


def format_value(value) -> str:
    """Floats below 1 keep four significant digits (an AUROC step on a test set of ~100 images is below 0.001, and
    p-values can be small); larger ones three decimals."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}"


def timing_rows(args, images, device, amp: bool) -> dict:
    """Throughput of the reference and ours (default; on CUDA also without prefetch and with the eager augmentation;
    fp32 NCHW; compiled if asked); evaluation time.

    The reference is timed first, with the C library's default allocator settings; ours then runs as
    run_training.py does (keep_freed_memory on the CPU unless --no-keep_freed_memory).
    """
    reference = {}
    if args.reference:
        reference.update({f"reference: {k}": v for k, v in bench_reference(args, images, device).items()})
        if args.data_dir is not None:
            reference["reference: eval s"] = median_of(lambda: bench_reference_eval(args, device)["eval s"],
                                                       args.eval_repeats)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    graph, ahead = args.cuda_graph, args.prefetch
    configs = [("ours", amp, True, False, graph, ahead)]  # label, amp, channels-last, compiled, graph, prefetch
    if device.type == "cuda":
        if ahead:
            configs.append(("ours without prefetch", amp, True, False, graph, False))
        if graph:
            configs.append(("ours eager augmentation", amp, True, False, False, ahead))
    configs.append(("ours fp32 NCHW", False, False, False, graph, ahead))
    if args.compile:
        configs.append(("ours compiled", amp, True, True, graph, ahead))
    rows = {}
    for label, *config in configs:
        rows.update({f"{label}: {k}": v for k, v in bench_ours(args, images, device, *config).items()})
    if args.data_dir is not None:
        rows.update({f"ours: {k}": v for k, v in bench_eval(args, device, amp).items()})
    rows.update(reference)
    if args.reference:
        rows["speed-up end-to-end (ours / reference)"] = \
            rows["ours: end-to-end img/s"] / rows["reference: end-to-end img/s"]
        if args.data_dir is not None:
            rows["speed-up eval in-process (reference / ours)"] = \
                rows["reference: eval s"] / rows["ours: eval in-process s"]
    return rows


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = bf16_supported(device)
    images = load_images(args, device)
    rows = timing_rows(args, images, device, amp) if args.timing else {}
    if args.auroc_steps > 0:
        rows.update(auroc_rows(args, images, device))
    rows.update(peak_memory(device))
    text = report(args, device, amp, rows)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    run_main(main)
