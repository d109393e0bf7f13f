"""Each folder layout is detected and read as it is, then trains and evaluates end to end; bad folders end in one
error that names the folder to give."""
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import eval as eval_script
import predict
import run_training
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE
from deploy.detector import Detector

TINY = ["--size", "32", "--epochs", "2", "--batch_size", "4", "--no-pretrained", "--variant", "normal",
        "--workers", "0", "--log_every", "1"]
# (training images, test images) of conftest.build_layout: the folder holds 2 of its 13 good images out.
COUNTS = {"mvtec2": (10, 7), "loco": (10, 7), "visa": (10, 7), "folder": (11, 6)}


def quietly(fn, *args, **kwargs):
    """fn's result and the text of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return fn(*args, **kwargs), [str(w.message) for w in caught]


@pytest.mark.parametrize("layout", sorted(COUNTS))
def test_each_layout_is_detected_and_read_with_its_masks(layout, layout_roots):
    root = layout_roots[layout]
    assert dataset.layout_of(root / "lid") == layout and dataset.resolve_categories(root, "all") == ["lid"]
    train = dataset.list_train_images(root, "lid")
    test, said = quietly(dataset.MVTecTest, root, "lid", 32)
    assert said == [], "every defect has its mask; VisA's class-index masks count as binary"
    assert (len(train), len(test)) == COUNTS[layout] and train == sorted(train)
    assert not {it.path for it in test.items} & set(train), "no training image is a test image"
    assert int(test.labels.sum()) == 4 and bool(test.has_mask.all())
    areas = test.masks[test.labels == 1].flatten(1).sum(1)
    drawn = [int((np.asarray(Image.open(m)) > 127).sum()) for m in (root.parent / "src").rglob("*_mask.png")]
    assert min(drawn) > 0 and sorted(areas.tolist()) == sorted(drawn), \
        "each mask is the one drawn: LOCO's two halves and VisA's labels 1, 2 make whole masks"
    assert not test.masks[test.labels == 0].any()
    assert f"in the {dataset.LAYOUT_NAMES[layout]} layout" in dataset.describe(root, ["lid"])


def test_plain_folder_split_is_seeded_and_said(layout_roots):
    folder = layout_roots["folder"] / "lid"
    train, held = dataset._folder_split(folder)
    assert (train, held) == dataset._folder_split(folder) and len(held) == 13 // dataset.HOLDOUT
    assert sorted(train + held) == dataset._images_in(folder / "good")
    assert f"2 of the 13 images in {folder / 'good'} held out" in dataset.describe(folder.parent, ["lid"])


def test_data_dir_may_name_the_category_folder(layout_roots, mvtec_root):
    for cat_dir in (layout_roots["visa"] / "lid", layout_roots["folder"] / "lid", mvtec_root / "cap"):
        assert dataset.resolve_categories(cat_dir, "all") == [cat_dir.name]
        assert dataset.list_train_images(cat_dir, cat_dir.name) == [
            Path(os.path.abspath(p)) for p in dataset.list_train_images(cat_dir.parent, cat_dir.name)]
    with pytest.raises(CutPasteError,
                       match=f"category 'cap', not 'lid'.*--data_dir {re.escape(str(mvtec_root))} for --type lid"):
        dataset.resolve_categories(mvtec_root / "cap", "lid")


@pytest.mark.parametrize("inside", ["train", "train/good", "test/hole"])
def test_a_folder_inside_a_category_names_the_category(inside, mvtec_root):
    folder = re.escape(str(mvtec_root / "lid"))
    with pytest.raises(CutPasteError, match=f"inside the category folder {folder}; give --data_dir"):
        dataset.resolve_categories(mvtec_root / "lid" / inside, "all")


def test_folder_masks_named_like_images_orphans_and_doubles(tmp_path, layout_roots):
    shutil.copytree(layout_roots["folder"], tmp_path / "f")
    masks = tmp_path / "f" / "lid" / "masks"
    shutil.copy(masks / "hole" / "000.png", masks / "hole" / "999_gt.png")
    items, said = quietly(dataset.list_test_items, tmp_path / "f", "lid")
    assert len(said) == 1 and "999_gt.png" in said[0] and "match no image" in said[0]
    assert all(it.mask_path is not None for it in items if it.label)
    shutil.copy(masks / "hole" / "000.png", masks / "hole" / "000_mask.png")
    with pytest.raises(CutPasteError, match="000.png matches several masks"):
        dataset.list_test_items(tmp_path / "f", "lid")


def test_mvtec_masks_named_like_their_images_give_pixel_metrics_without_warning(tmp_path, mvtec_root):
    shutil.copytree(mvtec_root / "cap", tmp_path / "cap")
    for mask in (tmp_path / "cap" / "ground_truth").rglob("*_mask.png"):
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    test, said = quietly(dataset.MVTecTest, tmp_path, "cap", 32)
    assert said == [] and bool(test.has_mask.all()) and test.masks[test.labels == 1].flatten(1).any(1).all()


def test_empty_good_folder_and_unknown_folder(tmp_path):
    (tmp_path / "w" / "good").mkdir(parents=True)
    with pytest.raises(CutPasteError, match=r"found 0 images in .*w[/\\]good"):
        dataset.list_train_images(tmp_path, "w")
    (tmp_path / "x").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "x" / "a.png")
    with pytest.raises(CutPasteError, match=r"x holds no train/good/.*put its clean images in .*x[/\\]good"):
        dataset.list_train_images(tmp_path, "x")


@pytest.mark.parametrize("layout", sorted(COUNTS))
def test_each_layout_trains_and_evaluates_with_pixel_metrics(layout, layout_roots, tmp_path, capsys):
    root = layout_roots[layout]
    if layout == "folder":  # a defect folder named test/ makes a plain folder look like MVTec AD: --layout decides
        root = shutil.copytree(root, tmp_path / "data")
        for folder in (root / "lid", root / "lid" / "masks"):
            (folder / "hole").rename(folder / "test")
        assert dataset.layout_of(root / "lid") == "mvtec"
    (path,) = run_training.main(["--data_dir", str(root), "--model_dir", str(tmp_path / "m"), "--log_dir",
                                 str(tmp_path / "logs"), "--layout", layout, *TINY])
    assert "lid" in path.name and f"data: {root} in the {dataset.LAYOUT_NAMES[layout]} layout" in \
        capsys.readouterr().out
    frame = eval_script.main(["--data_dir", str(root), "--model_dir", str(tmp_path / "m"), "--out_dir",
                              str(tmp_path / "Eval"), "--workers", "0", "--localization", "gradcam",
                              "--save_plots", "0", "--layout", layout])
    row = frame.iloc[0]
    assert row["category"] == "lid" and np.isfinite(row[["image_auroc", "pixel_auroc", "pro"]].astype(float)).all()


def test_a_folder_of_good_images_alone_trains_and_predicts(tmp_path, layout_roots):
    good = tmp_path / "widget" / "good"
    shutil.copytree(layout_roots["folder"] / "lid" / "good", good)
    (path,) = run_training.main(["--data_dir", str(good.parent), "--model_dir", str(tmp_path / "m"), "--log_dir",
                                 str(tmp_path / "logs"), *TINY])
    new = layout_roots["folder"] / "lid" / "hole"
    results = predict.main([str(new), "--checkpoint", str(path), "--out", str(tmp_path / "p.csv"), "--device", "cpu",
                            "--runtime", "eager"])
    frame = pd.read_csv(tmp_path / "p.csv")
    assert len(results) == len(frame) == 1 and frame["label"].isin(["normal", "anomalous"]).all()
    det = Detector.load(path, device="cpu", runtime="eager")
    assert frame["threshold"].iloc[0] == pytest.approx(det.threshold(DEFAULT_QUANTILE))
    assert torch.load(path, weights_only=True)["heldout_scores"].shape == (11,), "held-out images are not trained on"


@pytest.mark.parametrize("named", ["../outside.png", "/etc/passwd"])
def test_a_visa_table_naming_a_file_outside_its_root_is_refused(tmp_path, layout_roots, named):
    root = tmp_path / "visa"
    shutil.copytree(layout_roots["visa"], root)
    table = root / "split_csv" / "1cls.csv"
    lines = table.read_text().splitlines()
    lines[1] = ",".join(lines[1].split(",")[:3] + [named, ""])
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(CutPasteError, match=rf"1cls.csv names '{named}', which is outside"):
        dataset.list_train_images(root, "lid")
