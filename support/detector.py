"""Scoring new images with a trained checkpoint (predict.py): anomaly score, decision, CSV, overlays.

The score is the Mahalanobis distance of the embedding to the Gaussian of the clean training embeddings (Li et
al., CVPR 2021, section 3.3); an image is anomalous above --threshold, or above the --quantile of the clean training
images' held-out scores (about 1 - quantile of new clean images get flagged). From Python::

    det = Detector.load("models/model-bottle-<date>.tch"); results = det.predict(paths, det.threshold())
"""
import glob
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
from support import checkpoints
from support.errors import CutPasteError
from support.options import DEFAULT_QUANTILE, PREDICT_BATCH
from support.runtime import bf16_supported, embed_images, keep_freed_memory, memory_format, resolve_device

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


def _pil_to_u8(img: Image.Image, size: int) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


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
    """A trained model, its clean-image density and its threshold calibration. heatmap: optional callable
    (detector, uint8 (N, 3, S, S)) -> (N, S, S) anomaly maps, for patch-level models."""

    def __init__(self, model, density, size: int, device: torch.device, amp: bool, calibration_scores: torch.Tensor,
                 calibration_source: str, category: str = "", source: str = "", heatmap=None,
                 channels_last: bool = False):
        self.model, self.density, self.size = model, density, size
        self.device, self.amp = device, amp
        self.calibration_scores, self.calibration_source = calibration_scores, calibration_source
        self.category, self.source, self._heatmap, self.channels_last = category, source, heatmap, channels_last

    @classmethod
    def load(cls, path, device: str = "auto", amp: bool | None = None, heatmap=None,
             channels_last: bool | None = None) -> "Detector":
        """Read a checkpoint onto `device`. amp None follows training where the device runs bf16 natively (scores
        then match the density's training embeddings); channels_last None as runtime.choose picks it."""
        path = Path(path)
        ckpt = checkpoints.read_checkpoint(path)
        dev = resolve_device(device)
        if amp is None:
            amp = bool(ckpt["config"].get("amp", False)) and bf16_supported(dev)
        if channels_last is None:
            channels_last = dev.type == "cuda" or amp
        model = checkpoints.model_from_checkpoint(ckpt, path).to(dev, memory_format=memory_format(channels_last)).eval()
        held = ckpt.get("heldout_scores")
        if held is not None and held.numel() > 0:
            scores, source = held.float(), "held-out clean training scores"
        else:
            scores, source = ckpt["train_scores"].float(), "in-sample clean training scores (older checkpoint)"
        return cls(model, checkpoints.density_from_checkpoint(ckpt, path, dev), int(ckpt["size"]), dev, amp,
                   scores, source, ckpt["category"], str(path), heatmap, channels_last)

    def threshold(self, quantile: float = DEFAULT_QUANTILE) -> float:
        """The `quantile` of the clean training images' (held-out) scores: about 1 - quantile false alarms."""
        return density_lib.quantile_threshold(self.calibration_scores, quantile)

    def to_uint8(self, images) -> torch.Tensor:
        """Paths, PIL images or a tensor batch -> uint8 (N, 3, size, size), decoded as training decodes."""
        if torch.is_tensor(images):
            return _tensor_to_u8(images, self.size)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        out = [_pil_to_u8(im, self.size) if isinstance(im, Image.Image) else dataset.load_image(Path(im), self.size)
               for im in images]
        return torch.stack(out) if out else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)

    def score(self, images) -> torch.Tensor:
        """Anomaly scores (N,) float32 on the CPU for paths, PIL images or a (N, 3, H, W) tensor."""
        batch = self.to_uint8(images)
        if batch.shape[0] == 0:
            return torch.empty(0)
        emb = embed_images(self.model, batch, self.device, self.amp, self.channels_last)
        return self.density.score(density_lib.normalize(emb)).float().cpu()

    def heatmaps(self, images) -> torch.Tensor | None:
        """(N, size, size) anomaly maps where the model localizes; None for an image-level model."""
        if self._heatmap is None:
            return None
        return self._heatmap(self, self.to_uint8(images)).float().cpu()

    def predict(self, paths, threshold: float, batch_size: int = PREDICT_BATCH, workers: int = 0,
                on_batch=None) -> list[Prediction]:
        """Score image files against `threshold`; an undecodable file gets label 'error'. on_batch(paths, uint8
        images, scores), when given, sees each scored chunk (for overlays)."""
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[start:start + batch_size]]
            decoded = _decode_each(chunk, self.size, workers)
            good = [(p, img) for p, img in zip(chunk, decoded) if torch.is_tensor(img)]
            batch = torch.stack([img for _, img in good]) if good else None
            scores = self.score(batch) if good else torch.empty(0)
            by_path = {p: float(s) for (p, _), s in zip(good, scores.tolist())}
            results += [Prediction(p, by_path[p], ANOMALOUS if by_path[p] > threshold else NORMAL)
                        if torch.is_tensor(img) else Prediction(p, float("nan"), UNREADABLE, img)
                        for p, img in zip(chunk, decoded)]
            if on_batch is not None and good:
                on_batch([p for p, _ in good], batch, scores)
        return results


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
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in dataset.IMAGE_SUFFIXES)
            if not found:
                raise CutPasteError(f"found 0 images in {path} (looked for {', '.join(dataset.IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(item):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                raise CutPasteError(f"the pattern {item!r} matches no file; check it (quote it so the shell "
                                    f"does not expand it)")
            paths += found
        else:
            raise CutPasteError(f"{path} does not exist; give image files, folders or glob patterns")
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


def overlay_writer(detector: Detector, out_dir: Path, root: Path, threshold: float):
    """on_batch callback of Detector.predict that writes <out_dir>/<path below root, '/' -> '__'>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def write(paths, images, scores):
        maps = detector.heatmaps(images)
        for i, (path, score) in enumerate(zip(paths, scores.tolist())):
            rel = os.path.relpath(Path(path).resolve(), root)
            name = Path(rel).with_suffix(".png").as_posix().replace("/", "__")
            label = ANOMALOUS if score > threshold else NORMAL
            overlay_image(images[i], label, score, threshold, None if maps is None else maps[i]).save(out_dir / name)
    return write


def folder_truth(path: str) -> int:
    """MVTec layout: an image in a folder named 'good' is normal (0), in any other folder defective (1)."""
    return int(Path(path).parent.name != dataset.GOOD)


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


def write_csv(results: list[Prediction], threshold: float, out: Path) -> pd.DataFrame:
    frame = pd.DataFrame([(r.path, r.score, r.label, threshold, r.error) for r in results],
                         columns=["path", "score", "label", "threshold", "error"])
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return frame


def run(args) -> list[Prediction]:
    """predict.py: score the inputs, write the CSV (and overlays), print the summary."""
    if args.batch_size < 1 or args.workers < 0 or not 0.0 <= args.quantile <= 1.0:
        raise CutPasteError("--batch_size must be positive, --workers 0 or more, --quantile in [0, 1]")
    paths = expand_inputs(args.inputs)
    device = resolve_device(args.device, args.cuda)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    detector = Detector.load(choose_checkpoint(args.checkpoint, args.category), str(device), args.amp,
                             channels_last=args.channels_last)
    given = args.threshold is not None
    threshold = args.threshold if given else detector.threshold(args.quantile)
    source = "--threshold" if given else f"{args.quantile} quantile of the {detector.calibration_source}"
    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))
    writer = overlay_writer(detector, args.overlay_dir, root, threshold) if args.overlay_dir else None
    results = detector.predict(paths, threshold, args.batch_size, args.workers, on_batch=writer)
    for r in results:
        if r.label == UNREADABLE:
            print(f"warning: {r.error}", file=sys.stderr)
    write_csv(results, threshold, args.out)
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

