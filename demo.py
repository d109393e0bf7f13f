"""The embedded default: make a small synthetic category, train on it, evaluate it. No download.

    python demo.py

Writes demo_data/ (the images), models_demo/ (the checkpoint), logdirs/ (tensorboard) and
Eval/models_demo/ (plots and the results table). Runs in a few minutes on 2 CPU cores.
"""
import argparse
from pathlib import Path

import demo_data
import eval as eval_script
import run_training
from common import run_main

# Settings that finish within minutes on a laptop CPU and still separate the demo's defects.
DEMO_SIZE = 64
DEMO_STEPS = 300
DEMO_VARIANT = "normal"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate CutPaste on a synthetic category made on the spot.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("demo_data"), help="where the synthetic data is written")
    p.add_argument("--model_dir", type=Path, default=Path("models_demo"), help="where the checkpoint is written")
    p.add_argument("--size", type=int, default=DEMO_SIZE, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=DEMO_STEPS, help="optimizer steps")
    p.add_argument("--variant", type=str, default=DEMO_VARIANT, help="CutPaste variant")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the training")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N or auto")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    category = demo_data.DEMO_CATEGORY
    if not (args.data_dir / category).is_dir():
        print(f"writing the synthetic category {category!r} to {args.data_dir}")
        demo_data.make_dataset(args.data_dir, category, size=args.size, seed=args.seed)
    common = ["--data_dir", str(args.data_dir), "--type", category, "--model_dir", str(args.model_dir),
              "--device", args.device]
    run_training.main(common + ["--no-pretrained", "--variant", args.variant, "--epochs", str(args.epochs),
                                "--size", str(args.size), "--seed", str(args.seed)])
    return eval_script.main(common)


if __name__ == "__main__":
    run_main(main)
