"""predict.py and the Detector API: scores, thresholds, CSV, overlays, unreadable images, bad checkpoints."""
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import density
import predict
import run_training
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE, PATCH_SCORE_STRIDE
from deploy import overlays, prediction
from deploy.detector import Detector
from storage.checkpoints import CHECKPOINT_FORMAT


def train_lid(out: Path, mvtec_root: Path, *extra) -> Path:
    (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(out / "models"),
                                 "--log_dir", str(out / "logdirs"), "--epochs", "4", "--batch_size", "4",
                                 "--no-pretrained", "--variant", "normal", "--workers", "0", "--log_every", "3", *extra])
    return path


def test_detector_scores_paths_pil_and_tensors_alike(lid_checkpoint, mvtec_root):
    det = Detector.load(lid_checkpoint, device="cpu", runtime="eager")
    paths = [it.path for it in dataset.list_test_items(mvtec_root, "lid")]
    scores = det.score(paths)
    assert scores.shape == (len(paths),) and torch.isfinite(scores).all()
    assert torch.equal(det.score(dataset.load_images(paths, 32)), scores), "same batch, same numbers"
    with Image.open(paths[0]) as img:
        single = det.score([img])
    # Another batch size may take other kernels (bf16 autocast on some CPUs): equal up to rounding.
    assert torch.allclose(single, scores[:1], rtol=2e-2) and torch.equal(det.score(paths[0]), single)
    assert det.heatmaps(paths[:2]) is None, "an image-level model has no heatmap"


def test_threshold_is_a_quantile_of_held_out_clean_scores(lid_checkpoint):
    det = Detector.load(lid_checkpoint, device="cpu", runtime="eager")
    ckpt = torch.load(lid_checkpoint, weights_only=True)
    assert det.calibration_source.startswith("held-out") and ckpt["heldout_scores"].shape == (16,)
    ordered = ckpt["heldout_scores"].double().sort().values
    assert det.threshold(0.5) == pytest.approx(float(ordered[7] + ordered[8]) / 2, rel=1e-6), "16 scores: midway"
    assert det.threshold(1.0) == pytest.approx(float(ckpt["heldout_scores"].max()))
    with pytest.raises(ValueError, match="outside"):
        det.threshold(1.5)


def test_older_checkpoint_without_held_out_scores_falls_back_to_in_sample(tmp_path, lid_checkpoint):
    ckpt = torch.load(lid_checkpoint, weights_only=True)
    del ckpt["heldout_scores"]
    older = tmp_path / "older.tch"
    torch.save(ckpt, older)
    det = Detector.load(older, device="cpu", runtime="eager")
    assert det.calibration_source.startswith("in-sample")
    assert det.threshold(1.0) == pytest.approx(float(ckpt["train_scores"].max()))


def test_heldout_scores_leave_each_image_out():
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(40, 24, generator=gen)
    held = density.heldout_scores(emb, folds=4)
    fold0 = torch.arange(40) % 4 == 0
    est = density.GaussianDensityTorch().fit(density.normalize(emb[~fold0]))
    assert torch.allclose(held[fold0], est.score(density.normalize(emb[fold0])))
    in_sample = density.GaussianDensityTorch().fit(density.normalize(emb)).score(density.normalize(emb))
    assert held.mean() > in_sample.mean(), "scores of images the density never saw run higher"
    assert density.heldout_scores(emb[:2]).numel() == 0


def test_about_one_minus_the_quantile_of_new_clean_images_are_flagged():
    """predict.py's promise, on Gaussian stand-ins for clean embeddings (300 training images, 32-d): the q-quantile
    of the held-out scores flags about 1 - q of 20000 new clean draws, where the in-sample scores' quantile flags
    far more. Seeded; each tolerance is several times the deviation of the draw, and far from the in-sample rate."""
    gen = torch.Generator().manual_seed(0)
    mix, mean = torch.eye(32) + torch.randn(32, 32, generator=gen) / 32 ** 0.5, torch.randn(32, generator=gen)
    clean, new = (torch.randn(n, 32, generator=gen) @ mix + mean for n in (300, 20000))
    fitted, in_sample = density.fit_and_score(clean, clean)
    new_scores, held = fitted.score(density.normalize(new)), density.heldout_scores(clean)
    for q, tol in ((0.9, 0.03), (0.99, 0.006)):
        flagged = float((new_scores > density.quantile_threshold(held, q)).double().mean())
        assert abs(flagged - (1 - q)) < tol, (q, flagged)
        naive = float((new_scores > density.quantile_threshold(in_sample, q)).double().mean())
        assert naive > 1 - q + 2 * tol, (q, naive)


def test_cli_scores_folders_and_globs_reports_unreadable_files(tmp_path, lid_checkpoint, mvtec_root, capsys):
    images = tmp_path / "images"
    shutil.copytree(mvtec_root / "lid" / "test", images)
    (images / "good" / "zz_truncated.png").write_bytes((images / "good" / "000.png").read_bytes()[:40])
    (images / "notes.png").write_text("not an image")
    out = tmp_path / "pred.csv"
    results = predict.main([str(images / "good"), str(images / "[hms]*" / "*.png"), str(images / "notes.png"),
                            "--checkpoint", str(lid_checkpoint.parent), "--out", str(out), "--overlay_dir",
                            str(tmp_path / "overlays"), "--truth_from_folders", "--batch_size", "5", "--device", "cpu"])
    frame = pd.read_csv(out, keep_default_na=False)
    assert list(frame.columns) == ["path", "score", "label", "threshold", "error"]
    n_test = len(dataset.list_test_items(mvtec_root, "lid"))
    assert len(frame) == len(results) == n_test + 2
    bad = frame[frame["label"] == "error"]
    assert sorted(Path(p).name for p in bad["path"]) == ["notes.png", "zz_truncated.png"]
    assert all(Path(p).name in msg for p, msg in zip(bad["path"], bad["error"]))
    scored = frame[frame["label"] != "error"].astype({"score": float})
    assert len(scored) == n_test
    assert ((scored["score"] > scored["threshold"]) == (scored["label"] == "anomalous")).all()
    det = Detector.load(lid_checkpoint, device="cpu", runtime="eager")
    assert scored["threshold"].iloc[0] == pytest.approx(det.threshold(DEFAULT_QUANTILE))
    printed = capsys.readouterr()
    assert "zz_truncated.png" in printed.err and "accuracy: " in printed.out
    report = prediction.truth_report(results)
    assert report["images"] == n_test and report["true_negatives"] + report["false_positives"] == 4
    overlays = sorted(p.relative_to(tmp_path / "overlays").as_posix() for p in (tmp_path / "overlays").rglob("*.*"))
    assert len(overlays) == n_test and "good/000.png.overlay.png" in overlays and "hole/000.png.overlay.png" in overlays


def test_explicit_threshold_and_heatmap_overlay(tmp_path, lid_checkpoint, mvtec_root):
    paths = [it.path for it in dataset.list_test_items(mvtec_root, "lid")][:4]
    det = Detector.load(lid_checkpoint, device="cpu", runtime="eager")
    middle = float(det.score(paths).median())
    labels = [r.label for r in det.predict(paths, middle)]
    assert labels.count("anomalous") == 2 and labels.count("normal") == 2
    image = dataset.load_image(paths[0], 32)
    plain = overlays.overlay_image(image, "normal", 1.0, 2.0)
    blended = overlays.overlay_image(image, "normal", 1.0, 2.0, torch.linspace(0, 1, 32).repeat(32, 1))
    assert plain.size == blended.size == (32, 32) and plain.tobytes() != blended.tobytes()


def test_bad_inputs_and_checkpoints(tmp_path, lid_checkpoint, mvtec_root, capsys):
    img = str(mvtec_root / "lid" / "test" / "good" / "000.png")
    with pytest.raises(CutPasteError, match="nothing-here.*does not exist"):
        predict.main([str(tmp_path / "nothing-here.png"), "--checkpoint", str(lid_checkpoint)])
    with pytest.raises(CutPasteError, match="matches no file"):
        predict.main([str(tmp_path / "*.png"), "--checkpoint", str(lid_checkpoint)])
    ckpt = torch.load(lid_checkpoint, weights_only=True)
    newer = tmp_path / "newer.tch"
    torch.save({**ckpt, "format": CHECKPOINT_FORMAT + 1}, newer)
    with pytest.raises(CutPasteError, match=f"newer.tch has checkpoint format {CHECKPOINT_FORMAT + 1}"):
        Detector.load(newer)
    truncated = tmp_path / "truncated.tch"
    truncated.write_bytes(lid_checkpoint.read_bytes()[:5000])
    with pytest.raises(CutPasteError, match="truncated.tch.*truncated"):
        predict.main([img, "--checkpoint", str(truncated)])
    # In process: test_scripts.py runs one script as a process to show that such an error prints as one line.
    with pytest.raises(CutPasteError, match=r"^none of the 1 images could be read"):
        predict.main([str(newer), "--checkpoint", str(lid_checkpoint), "--out", str(tmp_path / "p.csv"),
                      "--device", "cpu"])
    assert "newer.tch" in capsys.readouterr().err


def test_overlays_never_overwrite_inputs_and_never_collide(tmp_path, lid_checkpoint, mvtec_root):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    source = mvtec_root / "lid" / "test"
    for name, src in (("a.png", "good/000.png"), ("a.jpg", "good/001.png"), ("sub/b.png", "hole/000.png"),
                      ("sub__b.png", "good/002.png")):
        Image.open(source / src).save(photos / name)
    before = {p: p.read_bytes() for p in photos.rglob("*.*")}
    args = [str(photos), "--checkpoint", str(lid_checkpoint), "--overlay_dir", str(photos), "--device", "cpu",
            "--runtime", "eager"]
    predict.main(args + ["--out", str(tmp_path / "first.csv")])
    assert all(p.read_bytes() == data for p, data in before.items()), "inputs untouched"
    written = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.overlay.png"))
    assert written == ["a.jpg.overlay.png", "a.png.overlay.png", "sub/b.png.overlay.png", "sub__b.png.overlay.png"]
    # A rerun reads those overlays as inputs, and a.png's overlay would land on one: refused before any scoring.
    with pytest.raises(CutPasteError, match=r"photos[/\\]a\.(png|jpg)\.overlay\.png, which is one of the inputs"):
        predict.main(args + ["--out", str(tmp_path / "second.csv")])
    assert not (tmp_path / "second.csv").exists()


@pytest.fixture(scope="module")
def patch_checkpoint(tmp_path_factory, mvtec_root) -> Path:
    return train_lid(tmp_path_factory.mktemp("predict_patch_model"), mvtec_root, "--size", "48", "--patch_size", "32")


def test_patch_model_scores_by_its_map_and_calibrates_on_held_out_maxima(tmp_path, patch_checkpoint, mvtec_root):
    ckpt = torch.load(patch_checkpoint, weights_only=True)
    assert ckpt["heldout_scores"].shape == (16,) and ckpt["score_stride"] == PATCH_SCORE_STRIDE
    det = Detector.load(patch_checkpoint, device="cpu")
    assert det.calibration_source == "held-out clean training map maxima"
    assert det.threshold(1.0) == pytest.approx(float(ckpt["heldout_scores"].max()))
    paths = [it.path for it in dataset.list_test_items(mvtec_root, "lid")]
    scores, maps = det.score_and_maps(paths)
    assert maps.shape == (len(paths), 48, 48) and torch.equal(scores, maps.amax(dim=(1, 2)))
    assert torch.equal(det.heatmaps(paths), maps)
    predict.main([str(mvtec_root / "lid" / "test"), "--checkpoint", str(patch_checkpoint), "--out",
                  str(tmp_path / "p.csv"), "--overlay_dir", str(tmp_path / "ov"), "--device", "cpu", "--runtime",
                  "eager"])
    overlay = Image.open(tmp_path / "ov" / "good" / "000.png.overlay.png")
    plain = overlays.overlay_image(dataset.load_image(paths[0], 48), "normal", 0.0, 1.0)
    assert overlay.size == (48, 48) and overlay.tobytes() != plain.tobytes(), "the heatmap is drawn"
    del ckpt["heldout_scores"]
    older = tmp_path / "older.tch"
    torch.save(ckpt, older)
    with pytest.raises(CutPasteError, match="older.tch holds no clean scores.*pass --threshold"):
        predict.main([str(paths[0]), "--checkpoint", str(older), "--out", str(tmp_path / "o.csv")])
    (result,) = predict.main([str(paths[0]), "--checkpoint", str(older), "--threshold", "1e9", "--out",
                              str(tmp_path / "o.csv"), "--device", "cpu", "--no-amp"])
    # In float32 and the same batch: bf16 kernels for another batch size round differently.
    alone = Detector.load(patch_checkpoint, device="cpu", amp=False).score(paths[:1])
    assert result.label == "normal" and result.score == pytest.approx(float(alone[0]), rel=1e-5)
