"""Smoke runs of the entry scripts on tiny synthetic data, and their errors on bad input."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from evaluation import metrics
from storage import checkpoints as engine
import demo
import eval as eval_script
import run_training
from common.errors import CutPasteError

ROOT = Path(__file__).resolve().parents[1]
# On the CPU, whatever the machine has: trainings and scores are compared bit for bit or to float32 rounding.
TINY = ["--size", "32", "--epochs", "6", "--batch_size", "4", "--no-pretrained", "--log_every", "2",
        "--workers", "0", "--device", "cpu"]


def train(tmp_path, mvtec_root, *extra, model_dir="models"):
    return run_training.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / model_dir),
                              "--log_dir", str(tmp_path / "logdirs"), *TINY, *extra])


@pytest.fixture(scope="module")
def lid_normal(tmp_path_factory, mvtec_root):
    """One tiny 'normal' model of lid, trained once for the tests that only read a checkpoint."""
    tmp = tmp_path_factory.mktemp("lid_normal")
    (path,) = train(tmp, mvtec_root, "--type", "lid", "--variant", "normal")
    return path


def copy_model(path, tmp_path) -> Path:
    """The checkpoint alone in a fresh model folder, for a test that changes it or evaluates that folder."""
    (tmp_path / "models").mkdir(exist_ok=True)
    return Path(shutil.copy(path, tmp_path / "models" / path.name))


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
                              "--out_dir", str(tmp_path / "Eval"), "--workers", "0", "--device", "cpu"])
    out = tmp_path / "Eval" / "models"
    for cat in ("cap", "lid"):
        for plot in ("roc.png", "score_hist.png", "tsne.png"):
            assert (out / cat / plot).stat().st_size > 1000
    table = pd.read_csv(out / "results.csv")
    assert list(table["category"]) == ["cap", "lid", "mean"]
    assert table["image_auroc"].between(0, 100).all()
    assert "| mean" in (out / "results.md").read_text().replace("|       mean", "| mean")
    assert frame["image_auroc"].iloc[-1] == pytest.approx(table["image_auroc"].iloc[:2].mean())
    assert [c for c in ("cap", "lid") if f'data-cat="{c}"' in (out / "report.html").read_text()] == ["cap", "lid"]
    # --test_epochs 3 logs the test AUROC after steps 3 and 6 (0-based 2, 5): the last is the final model's, as eval's.
    for cat, auroc in zip(table["category"][:2], table["image_auroc"]):
        (run_dir,) = (tmp_path / "logdirs").glob(f"model-{cat}-*")
        events = EventAccumulator(str(run_dir))
        events.Reload()
        logged = events.Scalars("test_image_auroc")
        assert [e.step for e in logged] == [2, 5] and 100 * logged[-1].value == pytest.approx(auroc, abs=1e-3)


def test_checkpoint_round_trip_reproduces_the_training_scores(lid_normal, training_scores_again):
    """The model and Gaussian read from the file score the clean training images as training did before writing."""
    stored, again = training_scores_again(lid_normal)
    assert stored.shape == (16,) and stored.std() > 0
    torch.testing.assert_close(again, stored, rtol=1e-4, atol=1e-4)


def test_same_seed_same_model(tmp_path, mvtec_root):
    short = ("--type", "lid", "--variant", "scar", "--seed", "3", "--epochs", "2")
    (a,) = train(tmp_path, mvtec_root, *short, model_dir="a")
    (b,) = train(tmp_path, mvtec_root, *short, model_dir="b")
    sa, sb = engine.read_checkpoint(a)["state_dict"], engine.read_checkpoint(b)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_densities_agree_and_auc_lines(tmp_path, mvtec_root, lid_normal, monkeypatch):
    """The Gaussian stored at the end of training scores the test set as one refitted here does, in float32 (torch)
    or float64 (sklearn): the scores agree to rounding (their AUROCs could differ by a near tie). The published
    command prints one 'lid AUC: <AUROC>' line (run as a process once; --cuda 1 would take a GPU over --device)."""
    copy_model(lid_normal, tmp_path)
    legacy = ("--cuda", "1", "--head_layer", "2", "--save_plots", "0", "--data_dir", str(mvtec_root))
    res = run_script("eval.py", "--density", "torch", *legacy, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if "AUC" in ln]
    assert re.fullmatch(r"lid AUC: \S+", line) and 0 <= float(line.split()[-1]) <= 1, line
    scores, real = {}, metrics.image_auroc

    def keep(labels, values):  # eval's test scores of the density `kind`
        scores[kind] = np.asarray(values, dtype=np.float64)
        return real(labels, values)
    monkeypatch.setattr(metrics, "image_auroc", keep)
    for kind in ("checkpoint", "torch", "sklearn"):
        eval_script.main(["--density", kind, "--save_plots", "0", "--data_dir", str(mvtec_root), "--device", "cpu",
                          "--model_dir", str(tmp_path / "models"), "--out_dir", str(tmp_path / "Eval")])
    assert scores["checkpoint"].std() > 0
    for kind in ("torch", "sklearn"):
        np.testing.assert_allclose(scores[kind], scores["checkpoint"], rtol=1e-4, err_msg=kind)
    assert (tmp_path / "Eval" / "models" / "results.md").exists()


def test_stored_density_reads_no_training_image(tmp_path, mvtec_root, lid_normal):
    path = copy_model(lid_normal, tmp_path)
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


def test_legacy_training_command_parses(tmp_path, mvtec_root, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_training.main(["--epochs", "2", "--test_epochs", "1", "--no-pretrained", "--cuda", "1", "--head_layer", "1",
                       "--batch_size", "2", "--variant", "3way", "--size", "32", "--data_dir", str(mvtec_root),
                       "--type", "cap", "--workers", "0"])
    assert len(list((tmp_path / "models").glob("model-cap-*.tch"))) == 1


def one_line_error(res, *fragments):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def in_process_error(main, argv, *fragments):
    """main(argv) raises the one-line CutPasteError that run_main prints, naming each fragment."""
    with pytest.raises(CutPasteError) as err:
        main(argv)
    assert "\n" not in str(err.value)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_bad_inputs_get_one_line_errors(tmp_path, mvtec_root, monkeypatch):
    # As a process once: run_main turns the error into one 'error:' line and exit code 2, no traceback.
    one_line_error(run_script("run_training.py", *TINY, cwd=tmp_path), "Data", "--data_dir")
    monkeypatch.chdir(tmp_path)
    in_process_error(run_training.main, [*TINY, "--data_dir", str(mvtec_root), "--type", "bottle"], "bottle", "--type")
    empty = tmp_path / "empty"
    (empty / "lid" / "train" / "good").mkdir(parents=True)
    in_process_error(run_training.main, [*TINY, "--data_dir", str(empty)], "found 0 images in", "train/good")
    broken = tmp_path / "broken"
    shutil.copytree(mvtec_root / "lid", broken / "lid")
    (broken / "lid" / "train" / "good" / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    in_process_error(run_training.main, [*TINY, "--data_dir", str(broken)], "003.png")
    res = run_script("run_training.py", *TINY, "--variant", "mixup", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'mixup'" in res.stderr
    res = run_script("eval.py", "--density", "kde", cwd=tmp_path)
    assert res.returncode == 2 and "invalid choice: 'kde'" in res.stderr
    in_process_error(eval_script.main, ["--model_dir", str(tmp_path / "none")], "none")


def test_bad_checkpoints_get_one_line_errors(tmp_path, mvtec_root, lid_normal):
    path = copy_model(lid_normal, tmp_path)
    args = ["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"), "--save_plots", "0",
            "--out_dir", str(tmp_path / "Eval")]
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["head_layer"] = 3  # declares a layout its weights do not have
    torch.save(ckpt, path)
    in_process_error(eval_script.main, args, path.name, "layout")
    path.write_bytes(path.read_bytes()[:1000])
    in_process_error(eval_script.main, args, path.name, "truncated")
    torch.save({"state_dict": ckpt["state_dict"]}, path)  # weights alone: not a file of this project
    in_process_error(eval_script.main, args, path.name, "not a checkpoint of this project", "missing format")


def test_help_answers_without_loading_torch():
    """Every script parses its flags before importing torch (or pandas), so that --help answers at once."""
    for script in ("run_training.py", "eval.py", "predict.py", "export.py", "demo.py", "reproduce.py",
                   "dataset.py"):
        probe = (f"import sys, runpy; sys.argv = ['{script}', '--help']; sys.path.insert(0, {str(ROOT)!r})\n"
                 f"try:\n    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
                 f"except SystemExit:\n    pass\n"
                 f"print('torch' in sys.modules, 'pandas' in sys.modules)")
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage:" in res.stdout, script + res.stderr
        assert res.stdout.splitlines()[-1] == "False False", f"{script} --help loads torch or pandas"


def test_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo.main(["--size", "32", "--epochs", "2"])
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if "AUC" in ln][0].startswith("lid AUC: ")
    assert "demo done in" in out.splitlines()[-1]
    assert (tmp_path / "demo_data" / "lid" / "ground_truth" / "stain").is_dir()
    assert (tmp_path / "Eval" / "models_demo" / "lid" / "roc.png").exists()
