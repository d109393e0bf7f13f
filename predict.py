"""Score new images with a trained CutPaste checkpoint or its export: anomaly score, decision, CSV, overlays.

    python predict.py --checkpoint models/model-bottle-<date>.tch photos/ more/*.png
    python predict.py --checkpoint models --category bottle Data/bottle/test --truth_from_folders

An image is "anomalous" when its score exceeds --threshold or, by default, the --quantile of the
clean training images' held-out scores (map maxima, for a patch-level model). Overlays go to
<overlay_dir>/<input path>.overlay.png. From Python: deploy.detector.Detector.
"""
import argparse
from pathlib import Path

from cli import options
from common.errors import run_main
from common.paper import DEFAULT_QUANTILE, PREDICT_BATCH


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Score images with a trained CutPaste checkpoint.",
                                parents=[options.runtime_flags(), options.inference_flags()],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", type=str, nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a checkpoint (.tch), a file of export.py (.onnx, .xml, TorchScript; run on the CPU), or a "
                        "folder of checkpoints (the newest of --category is used)")
    p.add_argument("--category", type=str, default=None,
                   help="with a folder for --checkpoint: the category whose checkpoint to use")
    p.add_argument("--threshold", type=float, default=None,
                   help="anomaly-score threshold; default: the --quantile of the clean training images' scores")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help="quantile of the held-out clean training scores used as threshold (about 1 - quantile "
                        "of clean images get flagged)")
    p.add_argument("--out", type=Path, default=Path("predictions.csv"), help="CSV written: path, score, label, ...")
    p.add_argument("--overlay_dir", type=Path, default=None,
                   help="also write each image with its decision frame (and heatmap, for a localizing model) here")
    p.add_argument("--report", type=Path, default=None,
                   help="also write this HTML page (its thumbnails in <name>_files/ beside it): every image as a card "
                        "sorted by score, the threshold, the unreadable files (doc/report.md)")
    p.add_argument("--truth_from_folders", action=argparse.BooleanOptionalAction, default=False,
                   help="take the truth from the folder names (MVTec layout: 'good' is normal) and print the accuracy")
    p.add_argument("--batch_size", type=int, default=PREDICT_BATCH, help="images decoded and scored at once")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from deploy import prediction  # torch and friends load after parsing, so that --help answers at once
    return prediction.run(args)


if __name__ == "__main__":
    run_main(main)
