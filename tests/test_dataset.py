import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from common.errors import CutPasteError


def test_enumeration_is_sorted_and_labelled(mvtec_root):
    train = dataset.list_train_images(mvtec_root, "lid")
    assert train == sorted(train) and len(train) == 16
    items = dataset.list_test_items(mvtec_root, "lid")
    assert [it.path for it in items] == sorted(it.path for it in items)
    assert {it.defect for it in items} == {"good", "hole", "missing", "scratch", "stain"}
    for it in items:
        assert it.label == int(it.defect != "good")
        assert (it.mask_path is None) == (it.defect == "good")


def test_resolve_all_and_list(mvtec_root):
    assert dataset.resolve_categories(mvtec_root, "all") == ["cap", "lid"]
    assert dataset.resolve_categories(mvtec_root, "lid, cap") == ["lid", "cap"]
    with pytest.raises(CutPasteError, match="does not exist"):
        dataset.resolve_categories(mvtec_root, "bottle")


def test_test_set_tensors(mvtec_root):
    test = dataset.MVTecTest(mvtec_root, "lid", size=24)
    n = len(test)
    assert test.images.shape == (n, 3, 24, 24) and test.images.dtype == torch.uint8
    assert test.masks.shape == (n, 24, 24) and test.masks.dtype == torch.bool
    good = test.labels == 0
    assert not test.masks[good].any()
    assert test.masks[~good].flatten(1).any(dim=1).all(), "every defect has a non-empty mask"


def test_formats_modes_and_sizes(tmp_path):
    folder = tmp_path / "odd" / "train" / "good"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L").save(folder / "a.PNG")
    Image.fromarray(rng.integers(0, 255, (40, 25, 4), dtype=np.uint8), "RGBA").save(folder / "b.png")
    Image.fromarray(rng.integers(0, 255, (33, 33, 3), dtype=np.uint8)).save(folder / "c.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "d.bmp")
    Image.fromarray(rng.integers(0, 255, (16, 48, 3), dtype=np.uint8)).save(folder / "e.tiff")
    (folder / "notes.txt").write_text("not an image")
    train = dataset.MVTecTrain(tmp_path, "odd", size=28, workers=2)
    assert [p.name for p in train.paths] == ["a.PNG", "b.png", "c.jpg", "d.bmp", "e.tiff"]
    assert train.images.shape == (5, 3, 28, 28)


def test_missing_root_and_empty_train(tmp_path):
    with pytest.raises(CutPasteError, match="does not exist.*--data_dir"):
        dataset.list_train_images(tmp_path / "nope", "lid")
    (tmp_path / "lid" / "train" / "good").mkdir(parents=True)
    with pytest.raises(CutPasteError, match=r"found 0 images in .*train[/\\]good"):
        dataset.list_train_images(tmp_path, "lid")


def test_truncated_image_names_the_file(tmp_path, mvtec_root):
    shutil.copytree(mvtec_root / "lid", tmp_path / "lid")
    bad = tmp_path / "lid" / "train" / "good" / "005.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(CutPasteError, match="005.png"):
        dataset.MVTecTrain(tmp_path, "lid", size=32)


def test_missing_and_wrong_size_masks_warn(tmp_path, mvtec_root):
    shutil.copytree(mvtec_root / "lid", tmp_path / "lid")
    gt = tmp_path / "lid" / "ground_truth"
    (gt / "hole" / "000_mask.png").unlink()
    Image.new("L", (16, 16), 255).save(gt / "stain" / "000_mask.png")  # half the size: resized
    ramp = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)))  # not binary: cut at half its max
    ramp.save(gt / "scratch" / "000_mask.png")
    ramp.save(gt / "scratch" / "001_mask.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        test = dataset.MVTecTest(tmp_path, "lid", size=32)
    text = [str(w.message) for w in caught]
    assert any(str(gt / "hole") in t and "000.png" in t for t in text)
    assert [t for t in text if "resized" in t] == [f"1 masks of another size than their image (resized), e.g. "
                                                   f"{gt / 'stain' / '000_mask.png'}"]
    assert len([t for t in text if "not binary" in t and t.startswith("2 masks")]) == 1, "once for both masks"
    assert int((~test.has_mask).sum()) == 1
    assert bool(test.masks[test.defects.index("stain")].all()), "the resized mask covers the image"
    assert int(test.masks[test.defects.index("scratch")].sum()) == 32 * 16, "values above 248 / 2"
    Image.new("L", (10, 20)).save(gt / "stain" / "000_mask.png")
    with pytest.raises(CutPasteError, match=r"stain[/\\]000_mask.png.*aspect ratio"):
        dataset.MVTecTest(tmp_path, "lid", size=32)


def test_each_category_once_and_none_is_an_error(mvtec_root):
    assert dataset.resolve_categories(mvtec_root, "lid,lid, cap") == ["lid", "cap"]
    for empty in ("", " , "):
        with pytest.raises(CutPasteError, match="names no category"):
            dataset.resolve_categories(mvtec_root, empty)


def test_hidden_files_are_not_images(tmp_path):
    folder = tmp_path / "lid" / "train" / "good"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS's resource-fork companion
    (folder / ".DS_Store").write_bytes(b"\x00")
    assert [p.name for p in dataset.list_train_images(tmp_path, "lid")] == ["a.png"]


def test_sixteen_bit_images_and_zero_one_masks_keep_their_values(tmp_path):
    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = dataset.load_image(tmp_path / "grey16.png", 8)
    assert pixels.shape == (3, 8, 8) and int(pixels.min()) == int(pixels.max()) == 128, "not clipped to white"
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:4, 2:4] = 1  # a mask stored as 0/1
    Image.fromarray(mask).save(tmp_path / "m01.png")
    Image.fromarray(mask * 255).save(tmp_path / "m255.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    m01 = dataset.load_mask(tmp_path / "m01.png", tmp_path / "img.png", 8)
    assert int(m01.sum()) == 4
    assert torch.equal(m01, dataset.load_mask(tmp_path / "m255.png", tmp_path / "img.png", 8))
