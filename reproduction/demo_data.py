"""A small synthetic category in the MVTec AD layout, made on the spot with no download.

A round, ribbed lid seen from above, with random shifts, lighting and noise. Its masked defects are kinds CutPaste
never draws (section 3.1 pastes rectangles): scratches, holes, stains and a missing wedge, so the demo measures
detection of unseen defects, not recall of the training augmentation.
"""
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECT_KINDS = ("scratch", "hole", "stain", "missing")
DEMO_CATEGORY = "lid"
# demo.py's settings: small enough for a CPU without bf16 in about a minute (its times and AUROC: doc/performance.md).
DEMO_SIZE = 64
DEMO_STEPS = 150
DEMO_BATCH_SIZE = 8
DEMO_VARIANT = "normal"


def _lid(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[float, float, float]]:
    """A clean lid image and its (centre y, centre x, radius) in pixels."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size * 0.015, 2)
    radius = size * (0.36 + rng.normal(0, 0.005))
    dist = np.hypot(yy - cy, xx - cx)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.cos(24 * theta)
    body = 0.55 + 0.15 * ribs * (dist > radius * 0.55) + 0.1 * (1 - dist / radius)
    shade = 1 + rng.normal(0, 0.03)
    base_color = np.array([0.35, 0.55, 0.75]) * shade
    background = np.array([0.85, 0.83, 0.80]) * shade
    inside = (dist <= radius)[..., None]
    img = np.where(inside, body[..., None] * base_color, background)
    img += rng.normal(0, 0.015, img.shape)
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return pil, (float(cy), float(cx), float(radius))


def _defect_mask(kind: str, rng: np.random.Generator, size: int, lid) -> Image.Image:
    """The region ('L' image, 0/255) that a defect of `kind` covers, placed on the lid."""
    cy, cx, radius = lid
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    r_pos = radius * math.sqrt(rng.uniform(0.05, 0.6))
    a_pos = rng.uniform(0, 2 * math.pi)
    py, px = cy + r_pos * math.sin(a_pos), cx + r_pos * math.cos(a_pos)
    if kind == "scratch":
        length, bend = size * rng.uniform(0.15, 0.3), rng.uniform(-0.6, 0.6)
        direction = rng.uniform(0, 2 * math.pi)
        pts = [(px + t * length * math.cos(direction + bend * t), py + t * length * math.sin(direction + bend * t))
               for t in np.linspace(-0.5, 0.5, 12)]
        draw.line(pts, fill=255, width=max(1, size // 32))
    elif kind == "hole":
        r = size * rng.uniform(0.03, 0.06)
        draw.ellipse([px - r, py - r, px + r, py + r], fill=255)
    elif kind == "stain":
        r = size * rng.uniform(0.06, 0.1)
        draw.ellipse([px - r, py - 0.7 * r, px + r, py + 0.7 * r], fill=255)
    elif kind == "missing":
        start = math.degrees(a_pos)
        box = [cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1]
        draw.pieslice(box, start, start + rng.uniform(20, 40), fill=255)
        inner = radius * 0.6
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return mask


def _apply_defect(img: Image.Image, kind: str, mask: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img).astype(np.float32) / 255
    alpha = np.asarray(mask).astype(np.float32)[..., None] / 255
    if kind == "stain":
        color = np.array([0.6, 0.3, 0.1]) * rng.uniform(0.8, 1.1)
        alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0))).astype(np.float32)[..., None] / 255 * 0.9
    else:  # a missing wedge shows the background
        color = np.array({"scratch": [0.15, 0.15, 0.17], "hole": [0.05, 0.05, 0.05]}.get(kind, [0.85, 0.83, 0.80]))
    out = arr * (1 - alpha) + color * alpha
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def make_dataset(root: Path, category: str = DEMO_CATEGORY, size: int = 64, n_train: int = 60,
                 n_test_good: int = 20, n_test_per_defect: int = 8, seed: int = 0) -> Path:
    """Write <root>/<category>/{train/good, test/<kind>, ground_truth/<kind>} PNGs; return the category folder."""
    rng = np.random.default_rng(seed)
    cat_dir = Path(root) / category
    for sub, count in (("train", n_train), ("test", n_test_good)):
        (cat_dir / sub / "good").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _lid(rng, size)[0].save(cat_dir / sub / "good" / f"{i:03d}.png")
    for kind in DEFECT_KINDS:
        (cat_dir / "test" / kind).mkdir(parents=True, exist_ok=True)
        (cat_dir / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n_test_per_defect):
            img, lid = _lid(rng, size)
            mask = _defect_mask(kind, rng, size, lid)
            _apply_defect(img, kind, mask, rng).save(cat_dir / "test" / kind / f"{i:03d}.png")
            mask.point(lambda v: 255 if v > 127 else 0).save(cat_dir / "ground_truth" / kind / f"{i:03d}_mask.png")
    return cat_dir

