"""predict.py's overlays: each image with its decision's frame, its score and a patch-level model's heatmap, written
to a mirror of the inputs' tree that never lands on an input."""
import os
from pathlib import Path, PurePath

import torch
from PIL import Image, ImageDraw

from common.errors import CutPasteError
from deploy.detector import ANOMALOUS, NORMAL
from evaluation.report import blend_heatmap

FRAME_COLOURS = {ANOMALOUS: (220, 30, 30), NORMAL: (30, 180, 60)}
FRAME_FRACTION = 0.04  # frame width, as a fraction of the image side


def overlay_image(image_u8: torch.Tensor, label: str, score: float, threshold: float,
                  heatmap: torch.Tensor | None = None) -> Image.Image:
    """The image with the heatmap blended in (when there is one) and a frame coloured by the decision."""
    img = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    if heatmap is not None:
        img = blend_heatmap(img, (heatmap / max(float(heatmap.max()), 1e-12)).clamp(0, 1).numpy())
    draw = ImageDraw.Draw(img)
    width = max(2, round(FRAME_FRACTION * img.width))
    draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=FRAME_COLOURS[label], width=width)
    text, origin = f"{label} {score:.2f} (thr {threshold:.2f})", (width + 2, width + 2)
    draw.rectangle(draw.textbbox(origin, text), fill=(0, 0, 0))  # legible on light and dark images
    draw.text(origin, text, fill=FRAME_COLOURS[label])
    return img


OVERLAY_SUFFIX = ".overlay.png"


def mirrored(resolved: list[PurePath]) -> list[PurePath]:
    """Absolute paths made relative to their deepest common folder; with none (Windows, inputs on several drives)
    each below its drive, under the drive's name ('C', or the share's)."""
    common = resolved[0].parent
    while not all(p.is_relative_to(common) for p in resolved) and common != common.parent:
        common = common.parent
    if all(p.is_relative_to(common) for p in resolved):
        return [p.relative_to(common) for p in resolved]
    return [type(p)("".join(c for c in p.drive if c.isalnum() or c in "._-") or "root", *p.parts[1:])
            for p in resolved]


def overlay_paths(paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """Each input's overlay: the input tree mirrored under out_dir, <name>.<ext>.overlay.png, unique per input.
    Refused (before any scoring) where an overlay would land on an input, e.g. a rerun into the input folder: the
    same file, whatever its path's spelling (os.path.samefile's test)."""
    resolved = [Path(p).resolve() for p in paths]
    targets = {str(p): Path(out_dir) / f"{m}{OVERLAY_SUFFIX}" for p, m in zip(paths, mirrored(resolved))}
    inputs = {(st.st_dev, st.st_ino) for st in map(os.stat, resolved)}
    clash = next((t for t in targets.values() if t.exists() and (t.stat().st_dev, t.stat().st_ino) in inputs), None)
    if clash is not None:
        raise CutPasteError(f"--overlay_dir {out_dir} would write {clash}, which is one of the inputs; choose an "
                            f"--overlay_dir outside the inputs (or move the earlier overlays away)")
    return targets


def overlay_writer(targets: dict[str, Path], threshold: float):
    """on_batch callback of Detector.predict that writes each image's overlay (with a patch-level model's map) to
    targets[path]."""
    def write(paths, images, scores, maps):
        for i, (path, score) in enumerate(zip(paths, scores.tolist())):
            label = ANOMALOUS if score > threshold else NORMAL
            targets[path].parent.mkdir(parents=True, exist_ok=True)
            overlay_image(images[i], label, score, threshold, None if maps is None else maps[i]).save(targets[path])
    return write
