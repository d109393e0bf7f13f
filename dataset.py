"""MVTec AD layout: sorted, validated file enumeration and decoding into uint8 tensors.

Layout (Bergmann et al., CVPR 2019)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect or good>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Images are decoded and resized once into uint8 (N, 3, size, size). torch is imported inside the functions that
make tensors, so `python dataset.py --help` answers at once; `python dataset.py --download Data` fetches the data.
"""
import argparse
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from support import download
from support.errors import CutPasteError, run_main

# The 15 categories of MVTec AD, in the order of the paper's Table 1.
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


@dataclass(frozen=True)
class TestItem:
    path: Path
    label: int  # 0 good, 1 defective
    defect: str  # "good" or the defect folder name
    mask_path: Path | None  # None for good images and for defects without a mask


def _images_in(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted; hidden files (.DS_Store, macOS's ._* companions) are not images."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def category_dir(root: Path, category: str) -> Path:
    """The category folder, validated; errors name the path and the fix."""
    root = Path(root)
    if not root.is_dir():
        raise CutPasteError(f"data root {root} does not exist; put MVTec AD there or pass --data_dir")
    path = root / category
    if not path.is_dir():
        present = ", ".join(present_categories(root)) or "none"
        raise CutPasteError(f"category folder {path} does not exist (categories found in {root}: {present}); "
                            f"check --type and --data_dir")
    return path


def present_categories(root: Path) -> list[str]:
    """Category folders under `root` that have a train/good folder: MVTec's first, in Table 1 order, then others."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p.name for p in root.iterdir() if (p / "train" / GOOD).is_dir())
    return [c for c in MVTEC_CATEGORIES if c in found] + [c for c in found if c not in MVTEC_CATEGORIES]


def resolve_categories(root: Path, types: str) -> list[str]:
    """--type: 'all' for every category present, else a comma-separated list (validated)."""
    if types == "all":
        cats = present_categories(root)
        if not cats:
            category_dir(root, MVTEC_CATEGORIES[0])  # raises the missing-root error if that is the cause
            raise CutPasteError(f"found no category with a train/good folder in {root}; check --data_dir")
        return cats
    cats = list(dict.fromkeys(c.strip() for c in types.split(",") if c.strip()))  # each once, in order
    if not cats:
        raise CutPasteError(f"--type {types!r} names no category; give one or more, comma-separated, or 'all'")
    for cat in cats:
        category_dir(root, cat)
    return cats


def list_train_images(root: Path, category: str) -> list[Path]:
    folder = category_dir(root, category) / "train" / GOOD
    files = _images_in(folder) if folder.is_dir() else []
    if not files:
        raise CutPasteError(f"found 0 images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)}); "
                            f"put the clean training images there")
    return files


def list_test_items(root: Path, category: str) -> list[TestItem]:
    """Sorted test images with label, defect type and mask path (None where absent, with a warning)."""
    cat_dir = category_dir(root, category)
    test_dir = cat_dir / "test"
    defects = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    items = []
    for defect in defects:
        for path in _images_in(test_dir / defect):
            mask = None
            if defect != GOOD:
                mask = cat_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                if not mask.is_file():
                    warnings.warn(f"no mask {mask} for {path}; image-level metrics still run")
                    mask = None
            items.append(TestItem(path, int(defect != GOOD), defect, mask))
    if not items:
        raise CutPasteError(f"found 0 images in {test_dir}/*/; put test images in {test_dir}/good and "
                            f"{test_dir}/<defect>")
    if len({it.label for it in items}) < 2:
        warnings.warn(f"{test_dir} holds only {'good' if items[0].label == 0 else 'defective'} images; "
                      f"AUROC is undefined")
    return items


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale scaled to 8 bits; PIL's convert() would clip them (all white)."""
    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return img
    arr = np.asarray(img, dtype=np.float64)
    full = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    return Image.fromarray(np.clip(arr / full * 255 + 0.5, 0, 255).astype(np.uint8), "L")


def load_image(path: Path, size: int):
    """Decode any PIL-readable image to RGB, resize to size x size (bilinear); uint8 tensor (3, size, size)."""
    import torch
    try:
        with Image.open(path) as img:
            arr = np.asarray(to_8bit(img).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise CutPasteError(f"cannot read image {path}: {err}; downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
                            f"if you trust the file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise CutPasteError(f"cannot read image {path} ({err}); replace or remove that file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_mask(mask_path: Path, image_path: Path, size: int):
    """Binary mask (size, size) bool, nearest-neighbour resized; None with a warning when it does not fit its image."""
    import torch
    try:
        with Image.open(mask_path) as mask, Image.open(image_path) as img:
            if mask.size != img.size:
                warnings.warn(f"mask {mask_path} is {mask.size}, its image {img.size}; mask ignored")
                return None
            arr = np.asarray(to_8bit(mask).convert("L").resize((size, size), Image.NEAREST))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        warnings.warn(f"cannot read mask {mask_path} ({err}); mask ignored")
        return None
    # Masks stored as 0/1 are binary as much as 0/255 ones; others are cut at half the range.
    return torch.from_numpy(arr > (0 if arr.max() <= 1 else 127))


def load_images(paths: list[Path], size: int, workers: int = 0):
    """uint8 (N, 3, size, size) of all `paths`, in `workers` threads if > 0 (PIL releases the GIL decoding)."""
    import torch
    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return torch.stack(list(pool.map(lambda p: load_image(p, size), paths)))
    return torch.stack([load_image(p, size) for p in paths])


class MVTecTrain:
    """Clean training images of one category as a decoded uint8 tensor `images` (N, 3, S, S)."""

    def __init__(self, root: Path, category: str, size: int, workers: int = 0):
        self.paths = list_train_images(root, category)
        self.images = load_images(self.paths, size, workers)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, idx):
        return self.images[idx]


class MVTecTest:
    """Test images: uint8 `images` (N, 3, S, S), `labels` (N,), `defects`, `masks` (N, S, S), all-zero for good
    images and for defects whose mask is missing (`has_mask` False)."""

    def __init__(self, root: Path, category: str, size: int, workers: int = 0):
        import torch
        self.items = list_test_items(root, category)
        self.images = load_images([it.path for it in self.items], size, workers)
        self.labels = torch.tensor([it.label for it in self.items])
        self.defects = [it.defect for it in self.items]
        masks = [load_mask(it.mask_path, it.path, size) if it.mask_path is not None else None for it in self.items]
        self.masks = torch.stack([torch.zeros(size, size, dtype=torch.bool) if m is None else m for m in masks])
        self.has_mask = torch.tensor([m is not None or it.label == 0 for m, it in zip(masks, self.items)])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        return self.images[idx], self.labels[idx], self.masks[idx]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Download and extract MVTec AD (resumable, checksummed, safe "
                                            "extraction).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--download", type=Path, required=True,
                   help="folder to download and extract MVTec AD into (then train with --data_dir FOLDER)")
    p.add_argument("--url", type=str, default=download.MVTEC_URL, help="address of the archive (a mirror may be given)")
    p.add_argument("--sha256", type=str, default=download.MVTEC_SHA256,
                   help="expected SHA-256 of the archive; a file that differs is moved aside, never extracted")
    p.add_argument("--retries", type=int, default=download.DOWNLOAD_RETRIES,
                   help="times an interrupted transfer is resumed automatically before giving up")
    p.add_argument("--keep_archive", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the archive after a successful extraction (--no-keep_archive deletes it)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.retries < 0:
        raise CutPasteError(f"--retries {args.retries} is negative; give 0 or more")
    download.download_mvtec(args.download, args.url, args.sha256, args.retries, args.keep_archive)
    found = present_categories(args.download)
    print(f"{args.download}: {len(found)} categories ({', '.join(found) or 'none'}); "
          f"train with --data_dir {args.download}")
    return found


if __name__ == "__main__":
    run_main(main)
