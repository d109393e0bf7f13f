"""The grid behind reproduce.py: train and evaluate variants x categories x seeds into one tidy CSV."""
import argparse
import os
import shlex
import shutil
from pathlib import Path

import pandas as pd

import dataset
from cli import options
from common.errors import CutPasteError
from evaluation import evaluate
from reproduction import demo_data, figures
from storage import checkpoints, files
from training import loop
from training.devices import resolve_device
from training.runstate import RUN_KEYS

# What identifies one result: a row with the same values is finished.
KEY = ("category", "variant", "seed", "backbone", "pretrained", "steps", "size")


def run_name(args, variant: str, seed: int) -> str:
    init = "pretrained" if args.pretrained else "scratch"
    return f"{variant}-{args.arch}-{init}-{args.epochs}steps-{args.size}px-seed{seed}"


def shared_settings(args) -> argparse.Namespace:
    """The grid's values of the flags reproduce.py shares with run_training.py and eval.py (options.grid_flags)."""
    return argparse.Namespace(**{key: getattr(args, key) for key in vars(options.arguments(options.grid_flags()))})


def split_args(text: str) -> list[str]:
    """--train_args / --eval_args split as the shell at hand would: POSIX rules, except on Windows, where a
    backslash is a path separator (C:\\data), not an escape; quotes around a word are dropped on both."""
    if os.name != "nt":
        return shlex.split(text)
    return [w[1:-1] if len(w) > 1 and w[0] == w[-1] and w[0] in "\"'" else w for w in shlex.split(text, posix=False)]


def train_args(args, variant: str, seed: int, categories: list[str]) -> argparse.Namespace:
    """run_training.py's arguments for one run: the grid's shared settings, the run's variant, seed, categories and
    folders, then the user's --train_args over them."""
    name = run_name(args, variant, seed)
    run = options.training_args(shared_settings(args), type=",".join(categories), variant=variant, seed=seed,
                                model_dir=args.out_dir / "models" / name, log_dir=args.out_dir / "logdirs" / name,
                                test_epochs=args.test_epochs)
    return options.training_parser().parse_args(split_args(args.train_args), namespace=run)


def config_mismatch(ckpt: dict, expected: dict) -> list[str]:
    """The run settings (runstate.RUN_KEYS) where the checkpoint differs from this grid (those it lacks cannot)."""
    config = ckpt["config"]
    return [f"--{key} {config[key]} (asked: {expected[key]})" for key in sorted(RUN_KEYS)
            if key in config and config[key] != expected[key]]


def grid_checkpoints(args, variant: str, seed: int, categories: list[str]) -> dict[str, tuple[Path, dict]]:
    """The newest checkpoint per category already in the run's folder, each checked against the grid's settings."""
    model_dir = args.out_dir / "models" / run_name(args, variant, seed)
    expected = vars(train_args(args, variant, seed, categories))
    found = {}
    for category, items in checkpoints.scan(model_dir).items():
        for path, ckpt in items:
            if diff := config_mismatch(ckpt, expected):
                raise CutPasteError(f"{path} was trained with other settings ({'; '.join(diff[:3])}); "
                                    f"give another --out_dir or remove that file")
        found[category] = items[-1]
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
    frame = pd.DataFrame(rows) if results.empty else pd.concat([results, pd.DataFrame(rows)], ignore_index=True)
    frame = frame.astype({"seed": str})
    frame = frame[list(KEY) + [c for c in frame.columns if c not in KEY]]
    frame = frame[~frame.apply(row_key, axis=1).duplicated(keep="last")]
    frame = frame.sort_values(["backbone", "pretrained", "steps", "size", "variant", "category", "seed"],
                              key=lambda col: col.astype(str)).reset_index(drop=True)
    files.write_csv(frame, path)
    return frame


def grid_columns(args, category: str, variant: str, seed: str) -> dict:
    return {"category": category, "variant": variant, "seed": seed, "backbone": args.arch,
            "pretrained": bool(args.pretrained), "steps": int(args.epochs), "size": int(args.size),
            "batch_size": int(args.batch_size), "head_layer": int(args.head_layer)}


def eval_args(args, run_dir: Path) -> argparse.Namespace:
    """eval.py's arguments for scoring the checkpoints of one run folder: the grid's shared settings, the folders,
    then the user's --eval_args over them."""
    scoring = options.eval_args(shared_settings(args), model_dir=run_dir, out_dir=args.out_dir / "eval")
    return options.eval_parser().parse_args(split_args(args.eval_args), namespace=scoring)


def run_one(args, variant: str, seed: int, categories: list[str], results: pd.DataFrame,
            device) -> pd.DataFrame:
    """Train what one (variant, seed) run lacks, evaluate what the CSV lacks; return the updated table."""
    name = run_name(args, variant, seed)
    found = grid_checkpoints(args, variant, seed, categories)  # also refuses a folder of other settings
    done = done_keys(results)
    todo = [c for c in categories if row_key(grid_columns(args, c, variant, str(seed))) not in done]
    if not todo:
        print(f"{name}: all {len(categories)} categories already in {args.csv}; skipped")
        return results
    if missing := [c for c in todo if c not in found]:
        print(f"{name}: training {', '.join(missing)}")
        loop.run(train_args(args, variant, seed, missing))
        found = grid_checkpoints(args, variant, seed, categories)
    ns = eval_args(args, args.out_dir / "models" / name)
    rows = [{**evaluate.evaluate_category(ns, c, *found[c], device), **grid_columns(args, c, variant, str(seed)),
             "models": 1, "logdir": str(args.out_dir / "logdirs" / name / found[c][0].stem)} for c in todo]
    return write_results(results, rows, args.csv)


def run_ensembles(args, categories: list[str], results: pd.DataFrame, device) -> pd.DataFrame:
    """--ensemble: score each (variant, category) with the models of all seeds together."""
    seeds = "+".join(str(s) for s in args.seed_list)
    done, rows = done_keys(results), []
    for variant in args.variant_list:
        todo = [c for c in categories if row_key(grid_columns(args, c, variant, seeds)) not in done]
        if not todo:
            continue
        runs = {s: grid_checkpoints(args, variant, s, categories) for s in args.seed_list}
        ns = eval_args(args, args.out_dir / "models" / run_name(args, variant, seeds))
        for category in todo:
            row = evaluate.evaluate_ensemble(ns, category, [runs[s][category] for s in args.seed_list], device)
            rows.append({**row, **grid_columns(args, category, variant, seeds), "models": len(args.seed_list),
                         "logdir": ""})
    return write_results(results, rows, args.csv) if rows else results


def run(args) -> pd.DataFrame:
    """reproduce.py (its arguments resolved): train and evaluate what the grid lacks, then draw the figures."""
    if args.preset == "demo" and args.type == demo_data.DEMO_CATEGORY and not (args.data_dir / args.type).is_dir():
        print(f"writing the synthetic category {args.type!r} to {args.data_dir}")
        demo_data.make_dataset(args.data_dir, args.type, size=args.size)
    categories = dataset.resolve_categories(args.data_dir, args.type, args.layout)
    print(dataset.describe(args.data_dir, categories, args.layout))
    if args.ensemble and len(args.seed_list) < 2:
        raise CutPasteError(f"--ensemble needs at least two --seeds (got {args.seeds}), e.g. --seeds 0,1,2,3,4")
    device = resolve_device(args.device, args.cuda)
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
        figures.draw(args.figures_dir / "results.csv", args.figures_dir, args)
    return results

