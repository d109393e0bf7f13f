"""Evaluate trained CutPaste models (Li et al., CVPR 2021, section 4): image AUROC per category, plots, and a
table beside the paper's; with anomaly maps also pixel AUROC, PRO and heatmap figures.

    python eval.py --model_dir models --head_layer 2
    python eval.py --density sklearn --cuda 1 --head_layer 2 --save_plots 0 | grep AUC
    python eval.py --model_dir models --ensemble            # every checkpoint per category, scores averaged
    python eval.py --model_dir models_patch --stride 16     # a patch-level model, scored densely
"""
from cli import options
from common.errors import run_main


def get_args_parser():
    return options.eval_parser()


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from evaluation import evaluate  # torch and friends load after parsing, so that --help answers at once
    return evaluate.run(args)


if __name__ == "__main__":
    run_main(main)
