"""Reproduce Table 1 of Li et al. (CVPR 2021): train and evaluate a grid of variants x categories x seeds.

    python reproduce.py --preset demo --figures_dir doc/demo       # synthetic category, minutes on a CPU
    python reproduce.py --data_dir Data --device cuda --seeds 0,1,2,3,4 --ensemble --figures_dir doc/mvtec

Each (variant, seed) run trains as run_training.py into <out_dir>/models/<run>/ and is scored as eval.py; every
result is one row of <out_dir>/results.csv. Checkpoints and rows already there are not redone, so an interrupted
grid resumes where it stopped. --figures_dir draws the README's figures and table from the CSV; --figures_from
draws them from an existing CSV without running anything:

    python reproduce.py --figures_from runs/demo/results.csv --figures_dir doc/demo
"""
import argparse
from pathlib import Path

from cli import options
from common.errors import CutPasteError, run_main
from common.paper import PAPER_SIZE, PAPER_TABLE1, PAPER_VARIANTS, VARIANTS
from reproduction import demo_data

# "paper": the paper's 256 px and the 10000 steps of the earlier reimplementation's published Table 1 commands (the
# batch of 32 clean images, 64 with their copies, is --batch_size's default). "demo": the synthetic category
# (doc/demo/).
PRESETS = {
    "paper": {"data_dir": Path("Data"), "type": "all", "size": PAPER_SIZE, "epochs": 10000, "test_epochs": 32},
    "demo": {"data_dir": Path("demo_data"), "type": demo_data.DEMO_CATEGORY, "size": demo_data.DEMO_SIZE,
             "epochs": 300, "test_epochs": 25},
}
# The figures: the earlier reimplementation's bar charts start the AUROC axis at 40 %, so that differences between
# 90 and 100 stay readable; the training curves are moving averages of this many logged points.
FIGURES_Y_MIN = 40.0
FIGURES_WINDOW = 10


def preset_flag() -> argparse.ArgumentParser:
    """--preset, first in --help, as the defaults of the other flags depend on it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset", type=str, choices=tuple(PRESETS), default="paper",
                   help="defaults for the options left unset: paper (MVTec AD in Data/, 256 px, 10000 steps) or "
                        "demo (the synthetic category, written to demo_data/ when missing; 64 px, 300 steps)")
    return p


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate a grid of CutPaste variants x categories x seeds "
                                            "and collect every result in one CSV. The flags it shares with "
                                            "run_training.py and eval.py mean what they mean there and go to every "
                                            "run; those whose default is None take it from --preset.",
                                parents=[preset_flag(), options.grid_flags()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Table 1's models are trained from scratch; eval.py's per-category plots of every run are off.
    p.set_defaults(data_dir=None, type=None, size=None, epochs=None, pretrained=False, save_plots=0)
    p.add_argument("--variants", type=str, default=",".join(PAPER_VARIANTS),
                   help="comma-separated CutPaste variants (Table 1: normal, scar, 3way)")
    p.add_argument("--seeds", type=str, default="0", help="comma-separated seeds, one run per seed and variant")
    p.add_argument("--test_epochs", type=int, default=None,
                   help="log the test AUROC every this many steps for the training curves; -1 disables; "
                        "None takes it from --preset")
    p.add_argument("--out_dir", type=Path, default=None,
                   help="models/, logdirs/, eval/ and results.csv go here; None: runs/<preset>")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=False,
                   help="also score each category and variant with all --seeds together (eval.py --ensemble)")
    p.add_argument("--figures_dir", type=Path, default=None,
                   help="when given, copy the CSV there and draw the bar charts, the table and the training curves")
    p.add_argument("--figures_from", type=Path, default=None,
                   help="only draw the figures of this results.csv into --figures_dir (default: the CSV's folder)")
    p.add_argument("--paper", type=Path, default=PAPER_TABLE1, help="Li et al.'s Table 1 as CSV")
    p.add_argument("--ymin", type=float, default=FIGURES_Y_MIN,
                   help="bar charts' AUROC axis starts here (%%), as the earlier reimplementation's did")
    p.add_argument("--window", type=int, default=FIGURES_WINDOW, help="points in the curves' moving average")
    p.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="draw training curves from the tensorboard logs named in the CSV's logdir column")
    p.add_argument("--train_args", type=str, default="",
                   help="further run_training.py flags for every run, quoted, e.g. \"--log_every 8\"")
    p.add_argument("--eval_args", type=str, default="",
                   help="further eval.py flags, quoted; extra result columns (pixel metrics) go into the CSV")
    return p


def resolve_args(args) -> argparse.Namespace:
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


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.figures_from is not None:
        from reproduction import figures  # pandas, seaborn and tensorboard load after parsing
        return figures.draw(args.figures_from, args.figures_dir or args.figures_from.parent, args)
    args = resolve_args(args)
    from reproduction import grid  # torch and friends load after parsing, so that --help answers at once
    return grid.run(args)


if __name__ == "__main__":
    run_main(main)
