"""predict.py's program: expand the inputs, score them with a Detector, write the CSV (and the overlays, the HTML
report), report the accuracy against folder names."""
import glob
import math
import sys
from pathlib import Path

import pandas as pd
from sklearn.metrics import confusion_matrix

import dataset
from common.errors import CutPasteError
from deploy.detector import ANOMALOUS, UNREADABLE, Detector, Prediction
from deploy.overlays import overlay_paths, overlay_writer
from evaluation import report
from storage import checkpoints, files
from training.devices import keep_freed_memory, resolve_device


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for images, glob patterns expanded; sorted per argument."""
    paths = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in dataset.IMAGE_SUFFIXES)
            none = f"found 0 images in {path} (looked for {', '.join(dataset.IMAGE_SUFFIXES)})"
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            none = f"the pattern {item!r} matches no file; check it (quote it so the shell does not expand it)"
        else:
            raise CutPasteError(f"{path} does not exist; give image files, folders or glob patterns")
        if not found:
            raise CutPasteError(none)
        paths += found
    return paths


def folder_truth(path: str) -> int:
    """An image in a folder named 'good' (MVTec AD, AD 2, LOCO, plain folders) or 'Normal' (VisA) is normal (0), in
    any other folder defective (1)."""
    return int(Path(path).parent.name.lower() not in (dataset.GOOD, "normal"))


def truth_report(results: list[Prediction]) -> dict:
    """Accuracy and confusion counts of the decisions against folder_truth, over the readable images."""
    scored = [r for r in results if r.label != UNREADABLE]
    truth = [folder_truth(r.path) for r in scored]
    decided = [int(r.label == ANOMALOUS) for r in scored]
    tn, fp, fn, tp = confusion_matrix(truth, decided, labels=[0, 1]).ravel().tolist()
    return {"images": len(scored), "accuracy": (tp + tn) / max(len(scored), 1), "true_positives": tp,
            "false_positives": fp, "true_negatives": tn, "false_negatives": fn}


def choose_checkpoint(path: Path, category: str | None) -> Path:
    """--checkpoint as a file, or the newest checkpoint of --category (or of its only category) in a folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise CutPasteError(f"checkpoint {path} does not exist; give a .tch file or the folder of checkpoints")
    chosen = checkpoints.newest(path, [category] if category else None)
    if len(chosen) > 1:
        raise CutPasteError(f"{path} holds checkpoints of {', '.join(sorted(chosen))}; choose one with --category")
    return next(iter(chosen.values()))[0]


def run(args) -> list[Prediction]:
    """predict.py: score the inputs, write the CSV (and overlays), print the summary."""
    if args.batch_size < 1 or args.workers < 0 or not 0.0 <= args.quantile <= 1.0:
        raise CutPasteError("--batch_size must be positive, --workers 0 or more, --quantile in [0, 1]")
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise CutPasteError(f"--threshold {args.threshold} is not a number; give a finite score")
    paths = expand_inputs(args.inputs)
    files.writable_file(args.out, "--out")  # before the work: the scores must have somewhere to go
    targets = overlay_paths(paths, files.writable_folder(args.overlay_dir, "--overlay_dir")) \
        if args.overlay_dir else None
    page = report.PredictionPage(args.report, paths) if args.report else None  # checked before any scoring
    device = resolve_device(args.device, args.cuda)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    detector = Detector.load(choose_checkpoint(args.checkpoint, args.category), str(device), args.amp,
                             args.channels_last, args.runtime)
    print(f"scoring with {detector.runtime}")
    given = args.threshold is not None
    threshold = args.threshold if given else detector.threshold(args.quantile)
    source = "--threshold" if given else f"{args.quantile} quantile of the {detector.calibration_source}"
    writer = overlay_writer(targets, threshold) if targets else None
    writer = page.watch(writer) if page else writer
    results = detector.predict(paths, threshold, args.batch_size, args.workers, on_batch=writer)
    for r in results:
        if r.label == UNREADABLE:
            print(f"warning: {r.error}", file=sys.stderr)
    frame = pd.DataFrame([(r.path, r.score, r.label, threshold, r.error) for r in results],
                         columns=["path", "score", "label", "threshold", "error"])
    files.write_csv(frame, args.out)
    if page:
        truth = folder_truth if args.truth_from_folders else None
        print(f"report: {page.write(results, threshold, source, detector.category, truth)}")
    n_bad, flagged = sum(r.label == UNREADABLE for r in results), sum(r.label == ANOMALOUS for r in results)
    if n_bad == len(results):
        raise CutPasteError(f"none of the {len(results)} images could be read (see the warnings); nothing scored")
    print(f"{detector.category}: scored {len(results) - n_bad} images ({n_bad} unreadable), {flagged} anomalous at "
          f"threshold {threshold:.4f} ({source}); CSV in {args.out}")
    if args.truth_from_folders:
        rep = truth_report(results)
        print(f"accuracy: {rep['accuracy']:.4f} on {rep['images']} images (true positives {rep['true_positives']}, "
              f"false positives {rep['false_positives']}, true negatives {rep['true_negatives']}, "
              f"false negatives {rep['false_negatives']})")
    return results

