"""Export a trained CutPaste checkpoint for deployment: one self-contained file that maps uint8 images to anomaly
scores (and maps, for a patch-level model), with its category, size and threshold calibration in its metadata.

    python export.py --checkpoint models/model-bottle-<date>.tch --format onnx --out bottle.onnx
    python predict.py --checkpoint bottle.onnx photos/

Details and speeds: doc/deploy.md.
"""
import argparse

from cli import options
from common.errors import run_main


def get_args_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description="Export a CutPaste checkpoint to ONNX, OpenVINO or TorchScript.",
                                   parents=[options.export_flags()],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    from deploy import export  # torch and the exporters load after parsing, so that --help answers at once
    meta = export.export(args.checkpoint, args.format, args.out, args.stride)
    threshold = "none" if meta["threshold"] is None else f"{meta['threshold']:.4f}"
    print(f"{meta['category']}: wrote {args.out} ({args.format}, {meta['size']} px"
          f"{', patch %d stride %d' % (meta['patch_size'], meta['stride']) if meta['patch_size'] else ''}; "
          f"threshold at the {meta['threshold_quantile']} quantile: {threshold}, {meta['calibration_source']})")
    return meta


if __name__ == "__main__":
    run_main(main)
