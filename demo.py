"""The embedded default: make a small synthetic category, train on it, evaluate it. No download.

    python demo.py

Writes demo_data/ (the images), models_demo/ (the checkpoint), logdirs/ (tensorboard) and
Eval/models_demo/ (plots and the results table), and prints its wall time at the end.
"""
import argparse
import time
from pathlib import Path

from cli import options
from common.errors import run_main
from common.paper import VARIANTS
from reproduction import demo_data


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train and evaluate CutPaste on a synthetic category made on the spot.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("demo_data"), help="where the synthetic data is written")
    p.add_argument("--model_dir", type=Path, default=Path("models_demo"), help="where the checkpoint is written")
    p.add_argument("--size", type=int, default=demo_data.DEMO_SIZE, help="image side in pixels")
    p.add_argument("--epochs", type=int, default=demo_data.DEMO_STEPS, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=demo_data.DEMO_BATCH_SIZE, help="clean images per step")
    p.add_argument("--variant", type=str, choices=VARIANTS, default=demo_data.DEMO_VARIANT, help="CutPaste variant")
    p.add_argument("--seed", type=int, default=0, help="seed for the data and the training")
    options.add_device_flag(p)
    return p


def main(argv=None):
    started = time.perf_counter()
    args = get_args_parser().parse_args(argv)
    from evaluation import evaluate  # torch loads after parsing: --help answers at once
    from training import loop
    category = demo_data.DEMO_CATEGORY
    if not (args.data_dir / category).is_dir():
        print(f"writing the synthetic category {category!r} to {args.data_dir}")
        demo_data.make_dataset(args.data_dir, category, size=args.size, seed=args.seed)
    common = {"data_dir": args.data_dir, "type": category, "model_dir": args.model_dir, "device": args.device}
    loop.run(options.training_args(**common, pretrained=False, variant=args.variant, epochs=args.epochs,
                                       size=args.size, batch_size=args.batch_size, seed=args.seed))
    frame = evaluate.run(options.eval_args(**common))
    print(f"demo done in {time.perf_counter() - started:.0f} s")
    return frame


if __name__ == "__main__":
    run_main(main)
