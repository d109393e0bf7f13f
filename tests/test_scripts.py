"""Smoke runs of the entry scripts on tiny synthetic data, and their errors on bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from support import checkpoints as engine
import eval as eval_script
import run_training
from support.errors import CutPasteError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "32", "--epochs", "6", "--batch_size", "4", "--no-pretrained", "--log_every", "2",
        "--workers", "0"]


def train(tmp_path, mvtec_root, *extra, model_dir="models"):
    return run_training.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / model_dir),
                              "--log_dir", str(tmp_path / "logdirs"), *TINY, *extra])


def run_script(script, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_train_then_eval_all_categories(tmp_path, mvtec_root):
    paths = train(tmp_path, mvtec_root, "--head_layer", "2", "--test_epochs", "3", "--variant", "3way")
    assert sorted(p.name.split("-")[1] for p in paths) == ["cap", "lid"]
    ckpt = engine.read_checkpoint(paths[0])
    assert ckpt["category"] == "cap" and ckpt["variant"] == "3way" and ckpt["steps"] == 6
    assert ckpt["model"]["head_layer"] == 2 and ckpt["density"]["precision"].shape == (512, 512)
    assert ckpt["config"]["seed"] == 0 and "code_version" in ckpt
    assert len(list((tmp_path / "logdirs").glob("model-lid-*/args.json"))) == 1
    # No --head_layer: the checkpoint decides.
    frame = eval_script.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"),
                              "--out_dir", str(tmp_path / "Eval"), "--workers", "0"])
    out = tmp_path / "Eval" / "models"
    for cat in ("cap", "lid"):
        for plot in ("roc.png", "score_hist.png", "tsne.png"):
            assert (out / cat / plot).stat().st_size > 1000
    table = pd.read_csv(out / "results.csv")
    assert list(table["category"]) == ["cap", "lid", "mean"]
    assert table["image_auroc"].between(0, 100).all()
    assert "| mean" in (out / "results.md").read_text().replace("|       mean", "| mean")
    assert frame["image_auroc"].iloc[-1] == pytest.approx(table["image_auroc"].iloc[:2].mean())


def test_checkpoint_round_trip_reproduces_embeddings(tmp_path, mvtec_root):
    (path,) = train(tmp_path, mvtec_root, "--type", "lid", "--variant", "normal")
    ckpt = engine.read_checkpoint(path)
    model = engine.model_from_checkpoint(ckpt, path).eval()
    x = torch.rand(3, 3, 32, 32)
    again = engine.model_from_checkpoint(engine.read_checkpoint(path), path).eval()
    assert torch.equal(model.embed(x), again.embed(x))
    assert torch.equal(ckpt["state_dict"]["out.weight"], model.out.weight)


def test_same_seed_same_model(tmp_path, mvtec_root):
    (a,) = train(tmp_path, mvtec_root, "--type", "lid", "--variant", "scar", "--seed", "3", model_dir="a")
    (b,) = train(tmp_path, mvtec_root, "--type", "lid", "--variant", "scar", "--seed", "3", model_dir="b")
    sa, sb = engine.read_checkpoint(a)["state_dict"], engine.read_checkpoint(b)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_densities_agree_and_auc_lines(tmp_path, mvtec_root):
    """The Gaussian stored at the end of training scores the test set as one refitted here does."""
    train(tmp_path, mvtec_root, "--type", "lid", "--variant", "union")
    lines = {}
    for kind in ("checkpoint", "torch", "sklearn"):
        res = run_script("eval.py", "--density", kind, "--cuda", "1", "--head_layer", "2", "--save_plots", "0",
                         "--data_dir", str(mvtec_root), cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        lines[kind] = [ln for ln in res.stdout.splitlines() if "AUC" in ln]
    assert len(lines["torch"]) == 1 and lines["torch"][0].startswith("lid AUC: 0.")
    for kind in ("checkpoint", "sklearn"):
        assert float(lines[kind][0].split()[-1]) == pytest.approx(float(lines["torch"][0].split()[-1]), abs=1e-6)
    assert (tmp_path / "Eval" / "models" / "results.md").exists()


def test_stored_density_reads_no_training_image(tmp_path, mvtec_root):
    (path,) = train(tmp_path, mvtec_root, "--type", "lid", "--variant", "normal")
    test_only = tmp_path / "test_only"
    shutil.copytree(mvtec_root / "lid", test_only / "lid", ignore=shutil.ignore_patterns("train"))
    args = ["--data_dir", str(test_only), "--model_dir", str(tmp_path / "models"), "--out_dir", str(tmp_path / "Eval"),
            "--save_plots", "0", "--workers", "0"]
    refit = eval_script.main([*args, "--data_dir", str(mvtec_root), "--density", "torch"])
    frame = eval_script.main(args)
    assert frame["image_auroc"].iloc[0] == pytest.approx(refit["image_auroc"].iloc[0], abs=1e-4)
    with pytest.raises(CutPasteError, match="found 0 images in"):
        eval_script.main([*args, "--density", "torch"])
    ckpt = engine.read_checkpoint(path)
    ckpt["patch_size"] = 32
    with pytest.raises(CutPasteError, match="patch-level model"):
        engine.density_from_checkpoint(ckpt, path, torch.device("cpu"))


def test_legacy_training_command_parses(tmp_path, mvtec_root):
    res = run_script("run_training.py", "--epochs", "2", "--test_epochs", "1", "--no-pretrained", "--cuda", "1",
                     "--head_layer", "1", "--batch_size", "2", "--variant", "3way", "--size", "32",
                     "--data_dir", str(mvtec_root), "--type", "cap", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "models").glob("model-cap-*.tch"))) == 1


def one_line_error(res, *fragments):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_bad_inputs_get_one_line_errors(tmp_path, mvtec_root):
    one_line_error(run_script("run_training.py", *TINY, cwd=tmp_path), "Data", "--data_dir")
    one_line_error(run_script("run_training.py", *TINY, "--data_dir", str(mvtec_root), "--type", "bottle",
                              cwd=tmp_path), "bottle", "--type")
    empty = tmp_path / "empty"
    (empty / "lid" / "train" / "good").mkdir(parents=True)
    one_line_error(run_script("run_training.py", *TINY, "--data_dir", str(empty), cwd=tmp_path),
                   "found 0 images in", "train/good")
    broken = tmp_path / "broken"
    shutil.copytree(mvtec_root / "lid", broken / "lid")
    (broken / "lid" / "train" / "good" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    one_line_error(run_script("run_training.py", *TINY, "--data_dir", str(broken), cwd=tmp_path), "003.png")
    res = run_script("run_training.py", *TINY, "--variant", "mixup", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'mixup'" in res.stderr
    res = run_script("eval.py", "--density", "kde", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'kde'" in res.stderr
    one_line_error(run_script("eval.py", "--model_dir", str(tmp_path / "none"), cwd=tmp_path), "none")


def test_bad_checkpoints_get_one_line_errors(tmp_path, mvtec_root):
    (path,) = train(tmp_path, mvtec_root, "--type", "lid", "--variant", "normal")
    args = ["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"), "--save_plots", "0"]
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["head_layer"] = 3  # declares a layout its weights do not have
    torch.save(ckpt, path)
    one_line_error(run_script("eval.py", *args, cwd=tmp_path), path.name, "layout")
    path.write_bytes(path.read_bytes()[:1000])
    one_line_error(run_script("eval.py", *args, cwd=tmp_path), path.name, "truncated")


def test_demo_runs_end_to_end(tmp_path):
    res = run_script("demo.py", "--size", "32", "--epochs", "3", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stdout.splitlines() if "AUC" in ln][0].startswith("lid AUC: ")
    assert (tmp_path / "demo_data" / "lid" / "ground_truth" / "stain").is_dir()
    assert (tmp_path / "Eval" / "models_demo" / "lid" / "roc.png").exists()
