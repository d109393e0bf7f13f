"""Reproduce Table 1 of Li et al. (CVPR 2021): train and evaluate a grid of variants x categories x seeds.

    python reproduce.py --preset demo --figures_dir doc/demo       # synthetic category, minutes on a CPU
    python reproduce.py --data_dir Data --device cuda --seeds 0,1,2,3,4 --ensemble --figures_dir doc/mvtec

Each (variant, seed) run trains through run_training.main into <out_dir>/models/<run>/ (tensorboard
logs in <out_dir>/logdirs/<run>/) and is scored with eval.py's own functions; every result is one
row of the tidy CSV <out_dir>/results.csv. A category that already has a checkpoint in its run folder
is not trained again and a row already in the CSV is not evaluated again, so an interrupted grid
resumes where it stopped. figures.py turns the CSV into the README's figures and table.
"""
import argparse
import os
import shlex
import shutil
import tempfile
from pathlib import Path

import pandas as pd

import dataset
import demo
import demo_data
import engine
import eval as eval_script
import figures
import run_training
from common import CutPasteError, bf16_supported, resolve_device, run_main
from cutpaste import VARIANTS
from model import DEFAULT_ARCH

# Table 1's single-model columns, as --variant values.
PAPER_VARIANTS = ("normal", "scar", "3way")
# Settings per preset. "paper": from scratch at 256 px, 32 clean images per step (the paper's batch of 64,
# 96 for 3-way) and the 10000 steps of the earlier reimplementation's published Table 1 commands.
# "demo": demo.py's settings on the synthetic category, monitored every 25 steps.
PRESETS = {
    "paper": {"data_dir": Path("Data"), "type": "all", "size": 256, "epochs": 10000, "test_epochs": 32,
              "batch_size": 32, "head_layer": 1},
    "demo": {"data_dir": Path("demo_data"), "type": demo_data.DEMO_CATEGORY, "size": demo.DEMO_SIZE,
             "epochs": demo.DEMO_STEPS, "test_epochs": 25, "batch_size": 32, "head_layer": 1},
}
# What identifies one result: a row with the same values is finished.
KEY = ("category", "variant", "seed", "backbone", "pretrained", "steps", "size")
# Training options that may differ between runs sharing a folder (where and how, not what is learned).
RUNTIME_OPTIONS = ("data_dir", "type", "model_dir", "log_dir", "device", "cuda", "workers", "amp",
                   "channels_last", "compile", "keep_freed_memory", "log_every", "test_epochs")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate a grid of CutPaste variants x categories x seeds "
                                            "and collect every result in one CSV.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", type=str, choices=tuple(PRESETS), default="paper",
                   help="defaults for the options left unset: paper (MVTec AD in Data/, 256 px, 10000 steps) or "
                        "demo (the synthetic category, written to demo_data/ when missing; 64 px, 300 steps)")
    p.add_argument("--data_dir", type=Path, default=None, help="MVTec AD root folder; None takes it from --preset")
    p.add_argument("--type", type=str, default=None,
                   help="comma-separated categories or 'all'; None takes it from --preset")
    p.add_argument("--variants", type=str, default=",".join(PAPER_VARIANTS),
                   help="comma-separated CutPaste variants (Table 1: normal, scar, 3way)")
    p.add_argument("--seeds", type=str, default="0", help="comma-separated seeds, one run per seed and variant")
    p.add_argument("--arch", type=str, default=DEFAULT_ARCH, help="backbone, as run_training.py --arch")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from ImageNet weights; Table 1's models are trained from scratch")
    p.add_argument("--epochs", type=int, default=None, help="optimizer steps per model; None takes it from --preset")
    p.add_argument("--size", type=int, default=None, help="image side in pixels; None takes it from --preset")
    p.add_argument("--batch_size", type=int, default=None, help="clean images per step; None takes it from --preset")
    p.add_argument("--head_layer", type=int, default=None, help="512-wide head layers; None takes it from --preset")
    p.add_argument("--test_epochs", type=int, default=None,
                   help="log the test AUROC every this many steps for the training curves; -1 disables; "
                        "None takes it from --preset")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="models/, logdirs/, eval/ and results.csv go here; None: runs/<preset>")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=False,
                   help="also score each category and variant with all --seeds together (eval.py --ensemble)")
    p.add_argument("--figures_dir", type=Path, default=None,
                   help="when given, copy the CSV there and draw the figures and table into it with figures.py")
    p.add_argument("--density", type=str, choices=eval_script.DENSITY_CHOICES, default=eval_script.CHECKPOINT_DENSITY,
                   help="Gaussian density for evaluation, as eval.py --density")
    p.add_argument("--save_plots", type=int, choices=(0, 1), default=0,
                   help="1 writes eval.py's per-category plots under <out_dir>/eval/")
    p.add_argument("--train_args", type=str, default="",
                   help="further run_training.py flags for every run, quoted, e.g. \"--lr 0.01\"")
    p.add_argument("--eval_args", type=str, default="",
                   help="further eval.py flags, quoted; extra result columns (pixel metrics) go into the CSV")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill unset options from the preset; parse the lists; check them."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out_dir = args.out_dir or Path("runs") / args.preset
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or not args.variant_list:
        raise CutPasteError(f"--variants {args.variants}: unknown {', '.join(bad) or 'none given'}; "
                            f"choose from {', '.join(VARIANTS)}")
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CutPasteError(f"--seeds {args.seeds} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        raise CutPasteError(f"--seeds {args.seeds}: give distinct integers, e.g. 0,1,2,3,4")
    return args


def run_name(args, variant: str, seed: int) -> str:
    init = "pretrained" if args.pretrained else "scratch"
    return f"{variant}-{args.arch}-{init}-{args.epochs}steps-{args.size}px-seed{seed}"


def train_argv(args, variant: str, seed: int, categories: list[str]) -> list[str]:
    """run_training.py's command line for one run."""
    name = run_name(args, variant, seed)
    return ["--data_dir", str(args.data_dir), "--type", ",".join(categories),
            "--model_dir", str(args.out_dir / "models" / name), "--log_dir", str(args.out_dir / "logdirs" / name),
            "--variant", variant, "--seed", str(seed), "--arch", args.arch,
            "--pretrained" if args.pretrained else "--no-pretrained", "--epochs", str(args.epochs),
            "--size", str(args.size), "--batch_size", str(args.batch_size), "--head_layer", str(args.head_layer),
            "--test_epochs", str(args.test_epochs), "--workers", str(args.workers), "--device", args.device,
            *shlex.split(args.train_args)]


def config_mismatch(ckpt: dict, expected: dict) -> list[str]:
    """Training options where the checkpoint differs from what this grid asks for (options that the code
    which wrote it did not have yet cannot differ)."""
    config = ckpt["config"]
    return [f"--{key} {config[key]} (asked: {value})" for key, value in sorted(expected.items())
            if key not in RUNTIME_OPTIONS and key in config and config[key] != value]


def finished_checkpoints(args, variant: str, seed: int, categories: list[str]) -> dict[str, tuple[Path, dict]]:
    """The newest checkpoint per category already in the run's folder, each checked against the grid's settings."""
    model_dir = args.out_dir / "models" / run_name(args, variant, seed)
    expected = vars(run_training.get_args_parser().parse_args(train_argv(args, variant, seed, categories)))
    found: dict[str, tuple[Path, dict]] = {}
    for path in sorted(model_dir.glob("*.tch")) if model_dir.is_dir() else []:
        ckpt = engine.read_checkpoint(path)
        diff = config_mismatch(ckpt, expected)
        if diff:
            raise CutPasteError(f"{path} was trained with other settings ({'; '.join(diff[:3])}); "
                                f"give another --out_dir or remove that file")
        if ckpt["category"] not in found or ckpt["created"] >= found[ckpt["category"]][1]["created"]:
            found[ckpt["category"]] = (path, ckpt)
    return found


def read_results(path: Path) -> pd.DataFrame:
    """The grid's CSV, or an empty frame; seeds stay text ("0", or "0+1+2" for an ensemble)."""
    if not path.exists():
        return pd.DataFrame(columns=list(KEY))
    try:
        return pd.read_csv(path, dtype={"seed": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CutPasteError(f"cannot read the results table {path} ({err}); fix or remove it") from None


def row_key(row) -> tuple:
    """The KEY values as text, whole floats without their '.0' (a CSV column with a gap reads back as float)."""
    return tuple(str(row[k]).removesuffix(".0") for k in KEY)


def done_keys(results: pd.DataFrame) -> set[tuple]:
    return {row_key(row) for _, row in results.iterrows()}


def write_results(results: pd.DataFrame, rows: list[dict], path: Path) -> pd.DataFrame:
    """Add rows (replacing rows with the same key), sort, and write the CSV atomically."""
    new = pd.DataFrame(rows)
    frame = new if results.empty else pd.concat([results, new], ignore_index=True)
    frame = frame.astype({"seed": str})
    frame = frame[list(KEY) + [c for c in frame.columns if c not in KEY]]
    frame = frame[~frame.apply(row_key, axis=1).duplicated(keep="last")]
    frame = frame.sort_values(["backbone", "pretrained", "steps", "size", "variant", "category", "seed"],
                              key=lambda col: col.astype(str)).reset_index(drop=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        frame.to_csv(fh, index=False)
    os.replace(tmp, path)
    return frame


def grid_columns(args, category: str, variant: str, seed: str) -> dict:
    return {"category": category, "variant": variant, "seed": seed, "backbone": args.arch,
            "pretrained": bool(args.pretrained), "steps": int(args.epochs), "size": int(args.size),
            "batch_size": int(args.batch_size), "head_layer": int(args.head_layer)}


def eval_namespace(args, run_dir: Path) -> argparse.Namespace:
    """eval.py's options for scoring the checkpoints of one run folder, as its own parser makes them."""
    ns = eval_script.get_args_parser().parse_args(
        ["--data_dir", str(args.data_dir), "--model_dir", str(run_dir), "--out_dir", str(args.out_dir / "eval"),
         "--density", args.density, "--save_plots", str(args.save_plots), "--workers", str(args.workers),
         "--device", args.device, *shlex.split(args.eval_args)])
    if ns.amp is None:
        ns.amp = bf16_supported(resolve_device(ns.device, ns.cuda))
    return ns


def run_one(args, variant: str, seed: int, categories: list[str], results: pd.DataFrame,
            device) -> pd.DataFrame:
    """Train what one (variant, seed) run lacks, evaluate what the CSV lacks; return the updated table."""
    name = run_name(args, variant, seed)
    found = finished_checkpoints(args, variant, seed, categories)  # also refuses a folder of other settings
    done = done_keys(results)
    todo = [c for c in categories if row_key(grid_columns(args, c, variant, str(seed))) not in done]
    if not todo:
        print(f"{name}: all {len(categories)} categories already in {args.csv}; skipped")
        return results
    missing = [c for c in todo if c not in found]
    if missing:
        print(f"{name}: training {', '.join(missing)}")
        run_training.main(train_argv(args, variant, seed, missing))
        found = finished_checkpoints(args, variant, seed, categories)
    ns = eval_namespace(args, args.out_dir / "models" / name)
    rows = []
    for category in todo:
        path, ckpt = found[category]
        row = eval_script.evaluate_category(ns, category, path, ckpt, device)
        rows.append({**row, **grid_columns(args, category, variant, str(seed)), "models": 1,
                     "logdir": str(args.out_dir / "logdirs" / name / path.stem)})
    return write_results(results, rows, args.csv)


def run_ensembles(args, categories: list[str], results: pd.DataFrame, device) -> pd.DataFrame:
    """--ensemble: score each (variant, category) with the models of all seeds together."""
    seeds = "+".join(str(s) for s in args.seed_list)
    done, rows = done_keys(results), []
    for variant in args.variant_list:
        todo = [c for c in categories if row_key(grid_columns(args, c, variant, seeds)) not in done]
        if not todo:
            continue
        runs = {s: finished_checkpoints(args, variant, s, categories) for s in args.seed_list}
        ns = eval_namespace(args, args.out_dir / "models" / run_name(args, variant, seeds))
        for category in todo:
            members = [runs[s][category] for s in args.seed_list]
            row = eval_script.evaluate_ensemble(ns, category, members, device)
            rows.append({**row, **grid_columns(args, category, variant, seeds), "models": len(members),
                         "logdir": ""})
    return write_results(results, rows, args.csv) if rows else results


def main(argv=None):
    args = resolve_args(get_args_parser().parse_args(argv))
    if args.preset == "demo" and args.type == demo_data.DEMO_CATEGORY and not (args.data_dir / args.type).is_dir():
        print(f"writing the synthetic category {args.type!r} to {args.data_dir}")
        demo_data.make_dataset(args.data_dir, args.type, size=args.size)
    categories = dataset.resolve_categories(args.data_dir, args.type)
    if args.ensemble and len(args.seed_list) < 2:
        raise CutPasteError(f"--ensemble needs at least two --seeds (got {args.seeds}), e.g. --seeds 0,1,2,3,4")
    device = resolve_device(args.device)
    args.csv = args.out_dir / "results.csv"
    results = read_results(args.csv)
    print(f"grid: {len(args.variant_list)} variants x {len(categories)} categories x {len(args.seed_list)} seeds, "
          f"{args.arch} {'pretrained' if args.pretrained else 'from scratch'}, {args.epochs} steps at {args.size} px "
          f"on {device}; results in {args.csv}")
    for variant in args.variant_list:
        for seed in args.seed_list:
            results = run_one(args, variant, seed, categories, results, device)
    if args.ensemble:
        results = run_ensembles(args, categories, results, device)
    if args.figures_dir is not None:
        args.figures_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.csv, args.figures_dir / "results.csv")
        figures.main(["--csv", str(args.figures_dir / "results.csv"), "--out_dir", str(args.figures_dir)])
    return results


if __name__ == "__main__":
    run_main(main)
