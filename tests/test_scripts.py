"""Smoke runs of the entry scripts on tiny synthetic data, and their errors on bad input."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import engine
import eval as eval_script
import run_training
from common import CutPasteError

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


def test_benchmark_smoke(tmp_path, mvtec_root):
    import benchmark
    rows = benchmark.main(["--data_dir", str(mvtec_root), "--type", "lid", "--size", "32", "--batch_size", "4",
                           "--steps", "1", "--warmup", "1", "--ref_workers", "0", "--workers", "0",
                           "--eval_repeats", "1", "--out", str(tmp_path / "bench.md")])
    for key in ("ours: end-to-end img/s", "ours: pipeline efficiency", "reference: end-to-end img/s",
                "ours: eval in-process s", "ours: eval command s (python eval.py, plots on)",
                "ours: eval command floor s (python eval.py --help)",
                "speed-up eval in-process (reference / ours)", "peak RSS MiB"):
        assert rows[key] > 0, key
    assert rows["ours: augmentation aten ops per step"] > 0
    assert "| ours: model step img/s |" in (tmp_path / "bench.md").read_text()


def test_accelerator_jitter_order_dispatches_fewer_ops():
    """What the stage-by-stage order is for: fewer launches than whole hue groups, counted by the benchmark."""
    import benchmark
    import cutpaste
    images = torch.rand(32, 3, 16, 16)
    p = cutpaste.sample_jitter(32, torch.Generator().manual_seed(0))
    factors = torch.stack([p.brightness, p.contrast, p.saturation], dim=1)
    out, luma = torch.empty_like(images), cutpaste._luma(images)
    by_group = benchmark.dispatched_ops(lambda: cutpaste._jitter_by_hue_group(images, p, factors, None, out, luma))
    by_stage = benchmark.dispatched_ops(lambda: cutpaste._jitter_by_stage(images, p, factors, None, out, luma))
    assert by_stage < 0.8 * by_group  # 299 against 408 (383 against 508 before the hue shift's broadcast)


def run_gpu_checks(data_dir, out, category):
    """gpu_checks.sh shrunk to a CPU smoke run: tiny images, one timed step, three training steps, no compile."""
    env = {**os.environ, "DEVICE": "cpu", "CATEGORY": category, "SIZE": "64", "STEPS": "1", "WARMUP": "1",
           "REPEATS": "1", "TRAIN_STEPS": "3", "LOC_IMAGES": "1", "COMPILE": "0", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "gpu_checks.sh"), str(data_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_checks_script_runs_every_check(tmp_path, mvtec_root):
    res = run_gpu_checks(mvtec_root, tmp_path / "out", "lid")
    assert res.returncode == 0, res.stdout[-2000:]
    out = tmp_path / "out"
    assert " passed" in (out / "cuda_tests.txt").read_text()
    assert "| ours: pipeline efficiency |" in (out / "benchmark_cuda.md").read_text()
    assert "images/s" in (out / "localization_cuda.txt").read_text()
    assert "lid AUC: " in (out / "train_eval_cuda.txt").read_text()
    assert "all checks passed" in (out / "log.txt").read_text()


def test_gpu_checks_script_reports_failed_checks(tmp_path, mvtec_root):
    res = run_gpu_checks(mvtec_root, tmp_path / "out", "no_such_category")
    assert res.returncode == 1
    assert "failed: benchmark train eval" in res.stdout


def test_timed_alternating_reports_both_calls_and_host_time():
    import time

    import benchmark
    (slow, slow_host), (fast, fast_host) = benchmark.timed_alternating(
        lambda: time.sleep(0.02), lambda: time.sleep(0.001), torch.device("cpu"), steps=3, warmup=1)
    assert slow >= 0.02 and fast >= 0.001
    assert 0 < slow_host <= slow and 0 < fast_host <= fast


def test_benchmark_auroc_comparison(mvtec_root):
    import benchmark
    args = ["--data_dir", str(mvtec_root), "--type", "lid", "--size", "32", "--batch_size", "4", "--no-timing",
            "--auroc_steps", "2", "--auroc_seeds", "0,1", "--ref_workers", "0", "--workers", "0",
            "--reference_our_step"]
    rows = benchmark.main(args)
    assert not any("img/s" in key for key in rows), "--no-timing measures no throughput"
    for name in ("ours", "reference", "reference augmentation, our step"):
        scores = [rows[f"{name}: image AUROC after 2 steps, seed {seed}"] for seed in (0, 1)]
        assert all(0 <= score <= 1 for score in scores)
        assert rows[f"{name}: mean image AUROC over seeds 0,1"] == pytest.approx(sum(scores) / 2)
    again = benchmark.main(args)
    for name in ("ours", "reference", "reference augmentation, our step"):
        key = f"{name}: image AUROC after 2 steps, seed 0"
        assert again[key] == rows[key], f"a seed reproduces {name}'s run"
    for label in ("ours - reference", "reference augmentation, our step - reference",
                  "ours - reference augmentation, our step"):
        assert f"{label}: sd of the paired differences" in rows, "two paired seeds get their spread"
        assert rows[f"{label}: loss of {benchmark.AUROC_MARGIN} or more excluded (95%)"] in ("yes", "no")


def test_paired_difference_known_case():
    import benchmark
    # differences 0.1, 0, -0.1: mean 0, sd 0.1, so the 95 % interval is +-t(0.975, 2) * 0.1 / sqrt(3).
    rows = benchmark.paired_difference([0.9, 0.8, 0.7], [0.8, 0.8, 0.8], label="a - b")
    assert rows["a - b: sd of the paired differences"] == pytest.approx(0.1)
    assert rows["a - b: paired t statistic"] == pytest.approx(0.0, abs=1e-9)
    assert rows["a - b: paired t-test p-value"] == pytest.approx(1.0)
    assert rows["a - b: seeds with a difference >= 0"] == "2 of 3"
    half = 4.302652729911275 * 0.1 / 3 ** 0.5
    assert rows["a - b: mean difference, 95% interval"] == f"[{-half:.4f}, {half:.4f}]"
    shifted = benchmark.paired_difference([0.9, 0.8, 0.7], [0.7, 0.7, 0.7], label="a - b")
    # differences 0.2, 0.1, 0: t = 0.1 / (0.1 / sqrt(3)); with 2 degrees of freedom p = 1 - t / sqrt(2 + t^2)
    t = 3 ** 0.5
    assert shifted["a - b: paired t statistic"] == pytest.approx(t)
    assert shifted["a - b: paired t-test p-value"] == pytest.approx(1 - t / (2 + t * t) ** 0.5)
    assert benchmark.paired_difference([0.9], [0.8]) == {}, "one seed has no spread"
    assert "ours - reference: paired t statistic" not in benchmark.paired_difference([0.9, 0.8], [0.8, 0.7]), \
        "no spread, no test"


def test_paired_difference_non_inferiority():
    import benchmark
    # differences 0.1, 0, -0.1: mean 0, standard error 0.1 / sqrt(3), so the one-sided 95 % lower bound is
    # -t(0.95, 2) * 0.1 / sqrt(3); the test of a loss >= margin has t = margin / (0.1 / sqrt(3)) and, with 2 degrees
    # of freedom, one-sided p = (1 - t / sqrt(2 + t^2)) / 2.
    bound = -2.919985580353726 * 0.1 / 3 ** 0.5
    for margin, excluded in ((0.2, "yes"), (0.1, "no")):
        rows = benchmark.paired_difference([0.9, 0.8, 0.7], [0.8, 0.8, 0.8], label="a - b", margin=margin)
        t = margin / (0.1 / 3 ** 0.5)
        assert rows["a - b: one-sided 95% lower bound of the mean difference"] == pytest.approx(bound)
        assert rows[f"a - b: p-value of a loss of {margin} or more"] == pytest.approx((1 - t / (2 + t * t) ** 0.5) / 2)
        assert rows[f"a - b: loss of {margin} or more excluded (95%)"] == excluded


def test_benchmark_rejects_a_negative_margin(mvtec_root):
    import benchmark
    with pytest.raises(CutPasteError, match="--auroc_margin must be a positive"):
        benchmark.main(["--data_dir", str(mvtec_root), "--type", "lid", "--size", "32", "--no-timing",
                        "--auroc_steps", "2", "--auroc_margin", "-0.01", "--workers", "0"])


def test_benchmark_table_keeps_small_values_readable():
    import benchmark
    # an AUROC's last digit and a small p-value survive; throughputs keep three decimals
    assert benchmark.format_value(0.98730158) == "0.9873"
    assert benchmark.format_value(0.000173) == "0.000173"
    assert benchmark.format_value(25.7) == "25.700"
    assert benchmark.format_value("yes") == "yes"
