"""Figures and tables from reproduce.py's CSV: bar charts against Li et al.'s Table 1, one markdown table of
all variants, and training curves read back from the tensorboard logs; files only, no display.

    python figures.py --csv runs/demo/results.csv --out_dir doc/demo
"""
import argparse
from pathlib import Path

from support import options
from support.errors import run_main

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Draw the results figures and table from reproduce.py's CSV.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--csv", type=Path, default=Path("runs/paper/results.csv"), help="reproduce.py's results table")
    p.add_argument("--out_dir", type=Path, default=Path("doc"), help="where the figures and table.md are written")
    p.add_argument("--paper", type=Path, default=options.PAPER_TABLE1, help="Li et al.'s Table 1 as CSV")
    p.add_argument("--ymin", type=float, default=options.FIGURES_Y_MIN,
                   help="bar charts' AUROC axis starts here (%%), as the earlier reimplementation's did")
    p.add_argument("--window", type=int, default=options.FIGURES_WINDOW, help="logged points in the training curves' moving average")
    p.add_argument("--curves", action=argparse.BooleanOptionalAction, default=True,
                   help="draw training curves from the tensorboard logs named in the CSV's logdir column")
    return p


def main(argv=None) -> list[Path]:
    args = get_args_parser().parse_args(argv)
    from support import figures  # pandas, seaborn and tensorboard load after parsing: --help answers at once
    return figures.draw(args)


if __name__ == "__main__":
    run_main(main)
