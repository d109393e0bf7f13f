"""Train one CutPaste model per category (Li et al., CVPR 2021, sections 3 and 4.1).

    python run_training.py --model_dir models --head_layer 2
    python run_training.py --epochs 10000 --test_epochs 32 --no-pretrained --cuda 1 --head_layer 1 --variant 3way
"""
from cli import options
from common.errors import run_main


def get_args_parser():
    return options.training_parser()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from training import loop  # torch and friends load after parsing, so that --help answers at once
    return loop.run(args)


if __name__ == "__main__":
    run_main(main)
