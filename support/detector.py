"""Scoring new images with a trained checkpoint (predict.py): anomaly score, decision, CSV, overlays.

The score is the Mahalanobis distance of the embedding to the Gaussian of the clean training embeddings (Li et
al., CVPR 2021, section 3.3); an image is anomalous above --threshold, or above the --quantile of the clean training
images' held-out scores (about 1 - quantile of new clean images get flagged). From Python::

    det = Detector.load("models/model-bottle-<date>.tch"); results = det.predict(paths, det.threshold())
"""
import glob
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from sklearn.metrics import confusion_matrix
from torchvision.transforms.v2 import functional as TF

import dataset
import density as density_lib
from support import checkpoints, patches, report
from support import export as export_lib
from support.errors import CutPasteError
from support.options import DEFAULT_QUANTILE, PATCH_SCORE_STRIDE, PREDICT_BATCH
from support.runtime import (bf16_supported, default_channels_last, embed_images, keep_freed_memory, memory_format,
                             resolve_device)

ANOMALOUS, NORMAL, UNREADABLE = "anomalous", "normal", "error"
FRAME_COLOURS = {ANOMALOUS: (220, 30, 30), NORMAL: (30, 180, 60)}
FRAME_FRACTION = 0.04  # frame width, as a fraction of the image side
HEATMAP_ALPHA = 0.5


@dataclass(frozen=True)
class Prediction:
    path: str
    score: float  # NaN when the image could not be read
    label: str  # "anomalous", "normal", or "error" for an unreadable image
    error: str = ""


def _tensor_to_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W), uint8 or float in [0, 1] -> uint8 (N, 3, size, size) (antialiased resize)."""
    images = images.unsqueeze(0) if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] != 3:
        raise CutPasteError(f"images must be (N, 3, H, W) or (3, H, W); got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[-2:] != (size, size):
        images = TF.resize(images, [size, size], antialias=True)
    return images


class Detector:
    """A trained model's scoring and its threshold calibration. forward: uint8 (N, 3, S, S) -> (scores (N,), anomaly
    maps (N, S, S) or None); heatmap: optional callable (detector, uint8 (N, 3, S, S)) -> (N, S, S) maps for the
    overlays of a model without maps of its own."""

    def __init__(self, forward, size: int, calibration_scores: torch.Tensor, calibration_source: str,
                 category: str = "", source: str = "", heatmap=None, localizes: bool = False, metadata=None):
        self._forward, self.size, self.localizes = forward, size, localizes
        self.calibration_scores, self.calibration_source = calibration_scores, calibration_source
        self.category, self.source, self._heatmap, self.metadata = category, source, heatmap, metadata or {}

    @classmethod
    def load(cls, path, device: str = "auto", amp: bool | None = None, heatmap=None,
             channels_last: bool | None = None) -> "Detector":
        """Read a checkpoint onto `device`, or an exported file (export.py; on the CPU, float32). amp None follows
        training where the device runs bf16 natively (scores then match the density's training embeddings);
        channels_last None as runtime.choose picks it. A patch-level model scores by its dense map's maximum."""
        path = Path(path)
        if export_lib.is_export(path):
            return cls.from_export(path, heatmap)
        ckpt = checkpoints.read_checkpoint(path)
        dev = resolve_device(device)
        if amp is None:
            amp = bool(ckpt["config"].get("amp", False)) and bf16_supported(dev)
        if channels_last is None:
            channels_last = default_channels_last(dev, amp)
        model = checkpoints.model_from_checkpoint(ckpt, path).to(dev, memory_format=memory_format(channels_last)).eval()
        density = checkpoints.density_from_checkpoint(ckpt, path, dev, patch_ok=True)
        size, patch = int(ckpt["size"]), int(ckpt.get("patch_size", 0))
        stride = int(ckpt.get("score_stride", PATCH_SCORE_STRIDE))
        forward = (dense_forward(patches.Runner(model, dev, amp, channels_last, progress=False), density, size,
                                  patch, stride) if patch else image_forward(model, density, dev, amp, channels_last))
        scores, source = export_lib.calibration(ckpt, stride)
        det = cls(forward, size, torch.tensor(scores), source, ckpt["category"], str(path), heatmap, bool(patch))
        det.model, det.density, det.device, det.amp, det.channels_last = model, density, dev, amp, channels_last
        return det

    @classmethod
    def from_export(cls, path, heatmap=None) -> "Detector":
        """An exported file (ONNX Runtime, OpenVINO or TorchScript, on the CPU); a patch model runs one image's
        patches per call, bounding memory."""
        run, meta = export_lib.open_export(Path(path))
        patch = int(meta["patch_size"])

        def forward(batch):
            outs = [run(part.numpy()) for part in batch.split(1 if patch else len(batch))]
            joined = [torch.from_numpy(np.concatenate(parts)).float() for parts in zip(*outs)]  # scores[, maps]
            return joined[0], joined[1] if patch else None
        return cls(forward, int(meta["size"]), torch.tensor(meta["calibration_scores"]), meta["calibration_source"],
                   meta["category"], str(path), heatmap, bool(patch), meta)

    def threshold(self, quantile: float = DEFAULT_QUANTILE) -> float:
        """The `quantile` of the clean training images' (held-out) scores: about 1 - quantile false alarms."""
        if self.calibration_scores.numel() == 0:
            raise CutPasteError(f"{self.source} holds no clean scores to calibrate a threshold on "
                                f"({self.calibration_source}); pass --threshold, or retrain it with this code")
        return density_lib.quantile_threshold(self.calibration_scores, quantile)

    def to_uint8(self, images) -> torch.Tensor:
        """Paths, PIL images or a tensor batch -> uint8 (N, 3, size, size), decoded as training decodes."""
        if torch.is_tensor(images):
            return _tensor_to_u8(images, self.size)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        out = [TF.pil_to_tensor(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR))
               if isinstance(im, Image.Image) else dataset.load_image(Path(im), self.size) for im in images]
        return torch.stack(out) if out else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)

    def score_and_maps(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Anomaly scores (N,) float32 on the CPU and, for a patch-level model, its maps (N, size, size)."""
        batch = self.to_uint8(images)
        if batch.shape[0] == 0:
            return torch.empty(0), (torch.empty(0, self.size, self.size) if self.localizes else None)
        scores, maps = self._forward(batch)
        return scores.float().cpu(), None if maps is None else maps.float().cpu()

    def score(self, images) -> torch.Tensor:
        """Anomaly scores (N,) float32 on the CPU for paths, PIL images or a (N, 3, H, W) tensor."""
        return self.score_and_maps(images)[0]

    def heatmaps(self, images) -> torch.Tensor | None:
        """(N, size, size) anomaly maps: a patch-level model's own, or the heatmap hook's; else None."""
        if self._heatmap is not None:
            return self._heatmap(self, self.to_uint8(images)).float().cpu()
        return self.score_and_maps(images)[1] if self.localizes else None

    def predict(self, paths, threshold: float, batch_size: int = PREDICT_BATCH, workers: int = 0,
                on_batch=None) -> list[Prediction]:
        """Score image files against `threshold`; an undecodable file gets label 'error'. on_batch(paths, uint8
        images, scores, maps or None), when given, sees each scored chunk (for overlays)."""
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[start:start + batch_size]]
            decoded = _decode_each(chunk, self.size, workers)
            good = [(p, img) for p, img in zip(chunk, decoded) if torch.is_tensor(img)]
            batch = torch.stack([img for _, img in good]) if good else None
            scores, maps = self.score_and_maps(batch) if good else (torch.empty(0), None)
            by_path = {p: float(s) for (p, _), s in zip(good, scores.tolist())}
            results += [Prediction(p, by_path[p], ANOMALOUS if by_path[p] > threshold else NORMAL)
                        if torch.is_tensor(img) else Prediction(p, float("nan"), UNREADABLE, img)
                        for p, img in zip(chunk, decoded)]
            if on_batch is not None and good:
                on_batch([p for p, _ in good], batch, scores, maps)
        return results


def image_forward(model, density, device: torch.device, amp: bool, channels_last: bool):
    """Section 3.3: the Mahalanobis distance of each image's embedding."""
    def forward(batch):
        emb = embed_images(model, batch, device, amp, channels_last)
        return density.score(density_lib.normalize(emb)), None
    return forward


def dense_forward(runner: patches.Runner, density, size: int, patch: int, stride: int):
    """Section 4.2: dense maps from the shared Gaussian of clean patches; the image score is the map's maximum."""
    shared = density_lib.PatchGaussians.shared(density)

    def forward(batch):
        maps = patches.upsample_scores(patches.score_grids(runner, shared, batch, patch, stride), size, size, patch,
                                       stride)
        return maps.amax(dim=(1, 2)), maps
    return forward


def _decode_each(paths: list[str], size: int, workers: int) -> list:
    """Each path's uint8 (3, size, size) image, or the error message when it cannot be decoded."""
    def one(path):
        try:
            return dataset.load_image(Path(path), size)
        except CutPasteError as err:
            return str(err)
    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, paths))
    return [one(p) for p in paths]


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


def overlay_image(image_u8: torch.Tensor, label: str, score: float, threshold: float,
                  heatmap: torch.Tensor | None = None) -> Image.Image:
    """The image with the heatmap blended in (when there is one) and a frame coloured by the decision."""
    img = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    if heatmap is not None:
        norm = (heatmap / max(float(heatmap.max()), 1e-12)).clamp(0, 1).numpy()
        colour = Image.fromarray((colormaps["jet"](norm)[..., :3] * 255).astype(np.uint8))
        img = Image.blend(img, colour, HEATMAP_ALPHA)
    draw = ImageDraw.Draw(img)
    width = max(2, round(FRAME_FRACTION * img.width))
    draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=FRAME_COLOURS[label], width=width)
    text, origin = f"{label} {score:.2f} (thr {threshold:.2f})", (width + 2, width + 2)
    draw.rectangle(draw.textbbox(origin, text), fill=(0, 0, 0))  # legible on light and dark images
    draw.text(origin, text, fill=FRAME_COLOURS[label])
    return img


OVERLAY_SUFFIX = ".overlay.png"


def overlay_paths(paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """Each input's overlay: the input tree mirrored under out_dir, <name>.<ext>.overlay.png, unique per input.
    Refused (before any scoring) where an overlay would land on an input, e.g. a rerun into the input folder."""
    resolved = [Path(p).resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    targets = {str(p): Path(out_dir) / (os.path.relpath(r, root) + OVERLAY_SUFFIX) for p, r in zip(paths, resolved)}
    inputs = set(resolved)
    clash = next((t for t in targets.values() if t.resolve() in inputs), None)
    if clash is not None:
        raise CutPasteError(f"--overlay_dir {out_dir} would write {clash}, which is one of the inputs; choose an "
                            f"--overlay_dir outside the inputs (or move the earlier overlays away)")
    return targets


def overlay_writer(detector: Detector, targets: dict[str, Path], threshold: float):
    """on_batch callback of Detector.predict that writes each image's overlay to targets[path]."""
    def write(paths, images, scores, maps):
        maps = maps if maps is not None else detector.heatmaps(images)
        for i, (path, score) in enumerate(zip(paths, scores.tolist())):
            label = ANOMALOUS if score > threshold else NORMAL
            targets[path].parent.mkdir(parents=True, exist_ok=True)
            overlay_image(images[i], label, score, threshold, None if maps is None else maps[i]).save(targets[path])
    return write


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
    checkpoints.writable_file(args.out, "--out")  # before the work: the scores must have somewhere to go
    targets = overlay_paths(paths, checkpoints.writable_folder(args.overlay_dir, "--overlay_dir")) \
        if args.overlay_dir else None
    page = report.PredictionPage(args.report, paths) if args.report else None  # checked before any scoring
    device = resolve_device(args.device, args.cuda)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    detector = Detector.load(choose_checkpoint(args.checkpoint, args.category), str(device), args.amp,
                             channels_last=args.channels_last)
    given = args.threshold is not None
    threshold = args.threshold if given else detector.threshold(args.quantile)
    source = "--threshold" if given else f"{args.quantile} quantile of the {detector.calibration_source}"
    writer = overlay_writer(detector, targets, threshold) if targets else None
    writer = page.watch(detector, writer) if page else writer
    results = detector.predict(paths, threshold, args.batch_size, args.workers, on_batch=writer)
    for r in results:
        if r.label == UNREADABLE:
            print(f"warning: {r.error}", file=sys.stderr)
    frame = pd.DataFrame([(r.path, r.score, r.label, threshold, r.error) for r in results],
                         columns=["path", "score", "label", "threshold", "error"])
    checkpoints.atomic_write(args.out, lambda fh: frame.to_csv(fh, index=False), "w")
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

