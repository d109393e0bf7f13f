"""Data folders read as they are: sorted, validated file enumeration and decoding into uint8 tensors.

Layouts (--layout; auto detects them from the folder), per category folder <c>:

    mvtec   MVTec AD: <c>/train/good, <c>/test/<good or defect>, <c>/ground_truth/<defect>/<stem>_mask.png
    mvtec2  MVTec AD 2: <c>/train/good, <c>/test_public/{good,bad}, <c>/test_public/ground_truth/bad/<stem>_mask.png
    loco    MVTec LOCO AD: as mvtec, with a folder of masks per image, ground_truth/<type>/<stem>/*.png (their union)
    visa    VisA: <root>/split_csv/1cls.csv (object,split,label,image,mask; paths relative to <root>)
    folder  <c>/good (a seeded 1 in 5 held out as clean test images), <c>/<defect>, <c>/masks/<defect> or
            <c>/ground_truth/<defect>

Masks match their image by stem: <stem>, <stem>_mask or <stem>_gt, any image suffix. The validation/ folders of
MVTec AD 2 and LOCO are not read: no checkpoint or setting is chosen on held-out data. Images are decoded and
resized once into uint8 (N, 3, size, size). torch is imported inside the functions that make tensors, so
`python dataset.py --help` answers at once; `python dataset.py --download Data` fetches MVTec AD.
"""
import argparse
import csv
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import CutPasteError, run_main
from storage import download

# The 15 categories of MVTec AD, in the order of the paper's Table 1.
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
LAYOUT_NAMES = {"mvtec": "MVTec AD", "mvtec2": "MVTec AD 2", "loco": "MVTec LOCO AD", "visa": "VisA",
                "folder": "plain folder"}
LOCO_TYPES = ("logical_anomalies", "structural_anomalies")
VISA_TABLE = Path("split_csv") / "1cls.csv"
MASK_TAILS = ("_mask", "_gt")
MASK_FOLDERS = ("masks", "ground_truth")
# A plain folder's clean test images: 1 in HOLDOUT of good/, drawn with a fixed seed, the same for every run.
HOLDOUT = 5
SPLIT_SEED = 0


@dataclass(frozen=True)
class TestItem:
    path: Path
    label: int  # 0 good, 1 defective
    defect: str  # "good" or the defect folder name
    mask_path: Path | None  # None for good images and for defects without a mask; a folder of masks for LOCO


def _images_in(folder: Path) -> list[Path]:
    """Image files in `folder`, sorted by their text (none if no folder); hidden ones (.DS_Store, macOS's ._*) are
    not images."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith(".")), key=str) if folder.is_dir() else []


def _absolute(path: Path) -> Path:
    """`path` made absolute lexically ('.' and '..' folded as written, links kept): a data tree linked in from
    another disk stays where the user put it."""
    return Path(os.path.abspath(path))


def _subfolders(folder: Path, skip=()) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in skip) if folder.is_dir() else []


def layout_of(folder: Path) -> str | None:
    """The layout of a category folder; None when `folder` is no category folder."""
    folder = Path(folder)
    if (folder / "Data" / "Images").is_dir() and (_absolute(folder).parent / VISA_TABLE).is_file():
        return "visa"
    if (folder / "test_public").is_dir():
        return "mvtec2"
    if (folder / "train" / GOOD).is_dir() or (folder / "test").is_dir():  # test/ alone: a stored density scores it
        return "loco" if any((folder / "test" / t).is_dir() for t in LOCO_TYPES) else "mvtec"
    return "folder" if (folder / GOOD).is_dir() else None


def _check_level(root: Path, in_folder_ok: bool) -> None:
    """Refuse a --data_dir inside a category folder (its train/ or train/good/, say), naming the one to give."""
    ups = [(up, layout_of(up)) for up in list(_absolute(root).parents)[:3]]
    # A category of another layout first: a plain folder's look (good/) is also that of a train/ folder.
    found = ([up for up, kind in ups if kind not in (None, "folder")]
             or [up for up, kind in ups if kind == "folder" and not in_folder_ok])
    if found:
        raise CutPasteError(f"--data_dir {root} is inside the category folder {found[0]}; give --data_dir "
                            f"{found[0]} (or --data_dir {found[0].parent} --type {found[0].name})")


def present_categories(root: Path) -> list[str]:
    """Category folders of `root` (`root` itself when it is one): MVTec AD's in Table 1 order, then the others."""
    root = Path(root)
    if layout_of(root) is not None:
        return [_absolute(root).name]
    found = [name for name in _subfolders(root) if layout_of(root / name) is not None]
    return [c for c in MVTEC_CATEGORIES if c in found] + [c for c in found if c not in MVTEC_CATEGORIES]


def locate(root: Path, category: str, layout: str = "auto") -> tuple[Path, str]:
    """(folder, layout) of `category` under the data root, or of the root itself when it is that category's folder."""
    root = Path(root)
    if not root.is_dir():
        raise CutPasteError(f"data root {root} does not exist; put the data there or pass --data_dir")
    own = layout_of(root)
    if own == "folder":  # a category's train/ holds good/ too
        _check_level(root, True)
    if own is not None and category != _absolute(root).name:
        raise CutPasteError(f"--data_dir {root} is the folder of category {_absolute(root).name!r}, not "
                            f"{category!r}; give --data_dir {_absolute(root).parent} for --type {category}")
    if own is None:
        _check_spelling(root, category)
    folder = _absolute(root) if own is not None else root / category
    if not folder.is_dir():
        present = present_categories(root)
        if not present:
            _check_level(root, False)
        raise CutPasteError(f"category folder {folder} does not exist (categories found in {root}: "
                            f"{', '.join(present) or 'none'}); check --type and --data_dir")
    found = layout_of(folder)
    if found is None and layout == "auto":
        raise CutPasteError(f"{folder} holds no train/good/ or test/ (MVTec AD, LOCO), test_public/ (AD 2), good/ "
                            f"(a plain folder) or Data/Images/ beside ../{VISA_TABLE} (VisA); put its clean images "
                            f"in {folder / GOOD}")
    return folder, found if layout == "auto" else layout


def _check_spelling(root: Path, category: str) -> None:
    """Refuse --type Lid for a folder lid/: a case-insensitive disk (macOS, Windows) opens it, but VisA's table and
    the results know the category by its folder's spelling."""
    names = os.listdir(root)
    same = [name for name in names if name.casefold() == category.casefold()]
    if category not in names and same:
        raise CutPasteError(f"--type {category}: the folder in {root} is spelled {same[0]!r}; give --type {same[0]}")


def resolve_categories(root: Path, types: str, layout: str = "auto") -> list[str]:
    """--type: 'all' for every category present, else a comma-separated list (validated)."""
    if types == "all":
        cats = present_categories(root)
        if not cats:
            locate(root, MVTEC_CATEGORIES[0], layout)  # raises the missing-root or wrong-level error if either
            raise CutPasteError(f"found no category folder in {root} (one with train/good/, test/ or good/); "
                                f"check --data_dir")
    else:
        cats = list(dict.fromkeys(c.strip() for c in types.split(",") if c.strip()))  # each once, in order
        if not cats:
            raise CutPasteError(f"--type {types!r} names no category; give one or more, comma-separated, or 'all'")
    for cat in cats:
        locate(root, cat, layout)
    return cats


def describe(root: Path, categories: list[str], layout: str = "auto") -> str:
    """One line: the layout `root` is read in, and where a plain folder's clean test images come from."""
    kinds = {cat: locate(root, cat, layout) for cat in categories}
    line = f"data: {root} in the {' and '.join(sorted({LAYOUT_NAMES[k] for _, k in kinds.values()}))} layout"
    for cat, (folder, kind) in kinds.items():
        if kind == "folder":
            train, held = _folder_split(folder)
            line += (f"; {cat}: {len(held)} of the {len(train) + len(held)} images in {folder / GOOD} held out "
                     f"(seed {SPLIT_SEED}) as clean test images")
    return line


def _visa_rows(folder: Path) -> list[tuple[str, int, Path, Path | None]]:
    """(split, label, image, mask) of the object `folder` in VisA's split table, paths made absolute."""
    table = folder.parent / VISA_TABLE
    if not table.is_file():
        raise CutPasteError(f"VisA split table {table} does not exist; give --data_dir the VisA root that holds it")
    with open(table, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"object", "split", "label", "image", "mask"} <= set(reader.fieldnames or ()):
            raise CutPasteError(f"{table} lacks the columns object,split,label,image,mask; use VisA's own file")
        rows = [r for r in reader if r["object"] == folder.name]
    return [(r["split"], int(r["label"] == "anomaly"), _below(folder.parent, r["image"], table),
             _below(folder.parent, r["mask"], table) if r["mask"] else None) for r in rows]


def _below(root: Path, relative: str, table: Path) -> Path:
    """A path named in a file, kept below `root`: what a file says never points elsewhere. Checked lexically (no
    absolute path or drive, no '..' above the root), so folders linked in from another disk are read."""
    norm = os.path.normpath(relative)  # the path used is the one checked: "a/../b" is b even where a is a link
    if Path(relative).anchor or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise CutPasteError(f"{table} names {relative!r}, which is outside {root}; VisA's table names files below "
                            f"its root: use VisA's own file")
    return root / norm


def _folder_split(folder: Path) -> tuple[list[Path], list[Path]]:
    """(train, clean test) images of a plain folder's good/: 1 in HOLDOUT held out, drawn with SPLIT_SEED."""
    good = _images_in(folder / GOOD)
    held = set(np.random.default_rng(SPLIT_SEED).permutation(len(good))[:len(good) // HOLDOUT].tolist())
    return [p for i, p in enumerate(good) if i not in held], [p for i, p in enumerate(good) if i in held]


def list_train_images(root: Path, category: str, layout: str = "auto") -> list[Path]:
    folder, layout = locate(root, category, layout)
    if layout == "visa":
        where = folder.parent / VISA_TABLE
        files = sorted((img for split, label, img, _ in _visa_rows(folder) if split == "train" and label == 0),
                       key=str)
    elif layout == "folder":
        where, files = folder / GOOD, _folder_split(folder)[0]
    else:
        where = folder / "train" / GOOD
        files = _images_in(where)
    if not files:
        raise CutPasteError(f"found 0 images in {where} (looked for {', '.join(IMAGE_SUFFIXES)}); "
                            f"put the clean training images there")
    return files


def _match_masks(images: list[Path], mask_dir: Path) -> dict[Path, Path]:
    """Each image's mask in `mask_dir` by stem (<stem>, <stem>_mask, <stem>_gt); masks matching no image are named
    in a warning, an image matching several is an error."""
    by_stem, found, orphans = {p.stem: p for p in images}, {}, []
    for mask in _images_in(mask_dir):
        stems = [mask.stem] + [mask.stem[:-len(t)] for t in MASK_TAILS if mask.stem.endswith(t)]
        image = next((by_stem[s] for s in stems if s in by_stem), None)
        if image is None:
            orphans.append(mask.name)
        elif image in found:
            raise CutPasteError(f"{image} matches several masks in {mask_dir} ({found[image].name}, {mask.name}); "
                                f"keep one")
        else:
            found[image] = mask
    if orphans:
        warnings.warn(f"{len(orphans)} masks in {mask_dir} match no image: {', '.join(orphans[:5])}"
                      f"{' ...' if len(orphans) > 5 else ''}; rename them like their images or remove them")
    return found


def _test_folder_items(test_dir: Path, gt_dir: Path, loco: bool = False, skip=()) -> list[TestItem]:
    """test_dir/<good or defect>/ images with their masks from gt_dir/<defect>/ (LOCO: gt_dir/<defect>/<stem>/)."""
    items = []
    for defect in _subfolders(test_dir, skip):
        images = _images_in(test_dir / defect)
        if defect == GOOD:
            masks = {}
        elif loco:
            masks = {p: gt_dir / defect / p.stem for p in images if (gt_dir / defect / p.stem).is_dir()}
        else:
            masks = _match_masks(images, gt_dir / defect)
        missing = [p.name for p in images if defect != GOOD and p not in masks]
        if missing:
            warnings.warn(f"no mask in {gt_dir / defect} for {len(missing)} images of {test_dir / defect} "
                          f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); image-level metrics "
                          f"still run")
        items += [TestItem(p, int(defect != GOOD), defect, masks.get(p)) for p in images]
    return items


def list_test_items(root: Path, category: str, layout: str = "auto") -> list[TestItem]:
    """Sorted test images with label, defect type and mask path (None where absent, with a warning)."""
    folder, layout = locate(root, category, layout)
    if layout == "visa":
        where = folder.parent / VISA_TABLE
        items = [TestItem(img, label, "anomaly" if label else GOOD, mask if label else None)
                 for split, label, img, mask in _visa_rows(folder) if split == "test"]
    elif layout == "folder":
        where = folder
        gt_dir = next((folder / m for m in MASK_FOLDERS if (folder / m).is_dir()), folder / MASK_FOLDERS[0])
        items = ([TestItem(p, 0, GOOD, None) for p in _folder_split(folder)[1]]
                 + _test_folder_items(folder, gt_dir, skip=(GOOD, *MASK_FOLDERS)))
    else:
        where = folder / ("test_public" if layout == "mvtec2" else "test")
        gt_dir = where / "ground_truth" if layout == "mvtec2" else folder / "ground_truth"
        items = _test_folder_items(where, gt_dir, layout == "loco", skip=("ground_truth",))
    if not items:
        raise CutPasteError(f"found 0 test images in {where}; put test images in {where}/good and "
                            f"{where}/<defect>" + (f" (good/ needs {HOLDOUT}+ images to hold some out)"
                                                  if layout == "folder" else ""))
    items.sort(key=lambda it: str(it.path))
    if len({it.label for it in items}) < 2:
        warnings.warn(f"{where} holds only {'good' if items[0].label == 0 else 'defective'} test images; "
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


def _warn_notes(notes: dict[str, list[Path]]) -> None:
    for kind, paths in notes.items():
        warnings.warn(f"{len(paths)} masks {kind}, e.g. {paths[0]}")


def load_mask(mask_path: Path, image_path: Path, size: int, nonzero: bool = False, notes: dict | None = None):
    """Binary mask (size, size) bool, nearest-neighbour resized; a folder of masks (LOCO) gives their union.
    A mask of another size (same aspect ratio) is resized, one with values besides 0 and its maximum is cut at half
    that (`nonzero`: at 0, for VisA's class-index masks); each such path goes into `notes` (kind -> paths), warned
    at once when `notes` is None. Another aspect ratio is an error; an unreadable mask is None with a warning."""
    import torch
    own, notes = notes is None, {} if notes is None else notes
    paths = _images_in(mask_path) if Path(mask_path).is_dir() else [mask_path]
    union = np.zeros((size, size), dtype=bool)
    try:
        with Image.open(image_path) as img:
            (width, height) = img.size
        for path in paths:
            with Image.open(path) as mask:
                (w, h) = mask.size
                if abs(w * height - h * width) > max(width, height):  # more than a pixel's rounding apart
                    raise CutPasteError(f"mask {path} is {w}x{h}, its image {image_path} {width}x{height}: another "
                                        f"aspect ratio, so not this image's mask; fix or remove it")
                if (w, h) != (width, height):
                    notes.setdefault("of another size than their image (resized)", []).append(path)
                arr = np.asarray(to_8bit(mask).convert("L").resize((size, size), Image.NEAREST))
            top = int(arr.max())
            if not nonzero and not np.isin(arr, (0, top)).all():
                notes.setdefault("not binary (cut at half their maximum)", []).append(path)
            union |= arr > (0 if nonzero else top / 2)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        warnings.warn(f"cannot read mask {mask_path} ({err}); mask ignored")
        return None
    if own:
        _warn_notes(notes)
    return torch.from_numpy(union) if paths else None


def load_images(paths: list[Path], size: int, workers: int = 0):
    """uint8 (N, 3, size, size) of all `paths`, in `workers` threads if > 0 (PIL releases the GIL decoding)."""
    import torch
    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return torch.stack(list(pool.map(lambda p: load_image(p, size), paths)))
    return torch.stack([load_image(p, size) for p in paths])


class MVTecTrain:
    """Clean training images of one category as a decoded uint8 tensor `images` (N, 3, S, S)."""

    def __init__(self, root: Path, category: str, size: int, workers: int = 0, layout: str = "auto"):
        self.paths = list_train_images(root, category, layout)
        self.images = load_images(self.paths, size, workers)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, idx):
        return self.images[idx]


class MVTecTest:
    """Test images: uint8 `images` (N, 3, S, S), `labels` (N,), `defects`, `masks` (N, S, S), all-zero for good
    images and for defects whose mask is missing (`has_mask` False)."""

    def __init__(self, root: Path, category: str, size: int, workers: int = 0, layout: str = "auto"):
        import torch
        self.items = list_test_items(root, category, layout)
        self.images = load_images([it.path for it in self.items], size, workers)
        self.labels = torch.tensor([it.label for it in self.items])
        self.defects = [it.defect for it in self.items]
        nonzero, notes = locate(root, category, layout)[1] == "visa", {}
        masks = [None if it.mask_path is None else load_mask(it.mask_path, it.path, size, nonzero, notes)
                 for it in self.items]
        _warn_notes(notes)  # once per kind, not once per mask
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
