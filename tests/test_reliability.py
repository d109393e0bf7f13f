"""Faults and hostile input (doc/reliability.md): a full disk, two runs at once, unwritable outputs, strings and
numbers from files, images over PIL's limit. Each test makes the fault for real where it can."""
import errno
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import eval as eval_script
import run_training
from common.errors import CutPasteError
from deploy.detector import Detector
from evaluation import evaluate
from storage import checkpoints, files
from training import loop, runstate

ROOT = Path(__file__).resolve().parents[1]
FILE_LIMIT = 4 << 20  # bytes: the tables fit, a ResNet18 checkpoint (45 MB) does not
TINY = ["--size", "32", "--epochs", "2", "--batch_size", "4", "--no-pretrained", "--log_every", "1",
        "--workers", "0", "--variant", "normal"]


def train(root: Path, data: Path, *extra):
    return run_training.main(["--data_dir", str(data), "--model_dir", str(root / "models"),
                              "--log_dir", str(root / "logdirs"), *TINY, *extra])


@pytest.fixture(scope="module")
def lid_model(tmp_path_factory, mvtec_root) -> Path:
    (path,) = train(tmp_path_factory.mktemp("lid"), mvtec_root, "--type", "lid")
    return path


def eval_args(data: Path, models: Path, out: Path, *extra) -> list[str]:
    return ["--data_dir", str(data), "--model_dir", str(models), "--out_dir", str(out), "--save_plots", "0",
            "--workers", "0", *extra]


def one_model_folder(path: Path, folder: Path, **changes) -> Path:
    """A model folder holding a copy of the checkpoint at `path`, with top-level `changes` written into it."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, folder / path.name)
    return folder / path.name


def limit_file_size():
    """In the child: files may not grow past FILE_LIMIT, as on a disk that fills; writes past it fail (EFBIG)."""
    import resource  # POSIX only: imported here, so that the other tests of this file run on Windows
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def test_a_filling_disk_ends_in_one_line_and_the_table(tmp_path, mvtec_root):
    pytest.importorskip("resource", reason="a file-size limit (RLIMIT_FSIZE) and preexec_fn are POSIX's")
    # Writes that stop part way are what a filling disk does; torch.save's own writer turns them into a
    # RuntimeError that names no cause, so checkpoints and states are serialised in memory and written plainly.
    res = subprocess.run([sys.executable, str(ROOT / "run_training.py"), "--data_dir", str(mvtec_root),
                          "--model_dir", str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"), *TINY,
                          "--type", "cap"], capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "File too large" in errors[0]
    assert "could not save the training state" in res.stderr
    assert pd.read_csv(tmp_path / "models" / "train_results.csv")["status"].tolist() == ["failed"]
    assert not list((tmp_path / "models").glob("*.tch")) and not list((tmp_path / "models").glob(".*.tmp"))


def test_a_full_disk_at_the_results_table_prints_it_instead(tmp_path, mvtec_root, monkeypatch, capsys):
    real = files.atomic_write

    def no_space(path, write, mode="wb"):
        if Path(path).name.startswith("train_results"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write, mode)
    monkeypatch.setattr(files, "atomic_write", no_space)
    (path,) = train(tmp_path, mvtec_root, "--type", "cap")
    err = capsys.readouterr().err
    assert "could not write the results table" in err and "the table above is its only copy" in err
    assert path.is_file(), "the checkpoint written before the table is kept"


def test_a_full_disk_at_evals_tables_keeps_the_old_ones_and_prints_the_new(tmp_path, disk_fills_at, capsys):
    row = {"category": "lid", "variant": "normal", "image_auroc": 87.5, "paper_image_auroc": float("nan"),
           "steps": 6, "size": 32, "density": "checkpoint", "checkpoint": "model-lid-x.tch", "patch_size": 0}
    out = tmp_path / "Eval" / "models"
    evaluate.write_tables([row], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["results.csv", "results.md"] and b"87.5" in before["results.md"]
    with disk_fills_at(64):  # the temporary file stops at 64 bytes
        frame = evaluate.write_tables([{**row, "image_auroc": 62.5}], out)
    printed = capsys.readouterr()
    assert frame["image_auroc"].tolist() == [62.5, 62.5] and "62.5" in printed.out, "the new table is printed"
    assert f"could not write the results tables into {out}" in printed.err and "their only copy" in printed.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old tables whole, no temporary file left"


def test_a_second_process_training_the_same_category_into_one_folder_is_refused(tmp_path, mvtec_root):
    models = tmp_path / "models"
    models.mkdir()
    lock = models / "cap.lock"
    hold = ("import filelock, sys, time; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(120)")  # the lock training takes, by another process
    holder = subprocess.Popen([sys.executable, "-c", hold, str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CutPasteError, match=r"another training of cap is writing into .*cap.lock.*--model_dir"):
            train(tmp_path, mvtec_root, "--type", "cap")
    finally:
        holder.kill()
        holder.wait()
    assert not list(models.glob("*.tch")) and not runstate.state_path(models, "cap").exists()
    (path,) = train(tmp_path, mvtec_root, "--type", "cap")  # the lock dies with its process
    assert path.is_file()


def test_run_names_are_claimed_so_one_second_never_gives_two_runs_one_name(tmp_path):
    args = run_training.get_args_parser().parse_args(["--model_dir", str(tmp_path / "m"),
                                                      "--log_dir", str(tmp_path / "l")])
    assert loop.claim_name(args, "model-cap-2026-12-01_10_00_00")
    assert not loop.claim_name(args, "model-cap-2026-12-01_10_00_00"), "a second claimant is refused"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model-cap-x.tch").touch()
    assert not loop.claim_name(args, "model-cap-x"), "a finished checkpoint's name is taken"


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, mvtec_root, lid_model, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(loop, "train_all", lambda *a: pytest.fail("training started"))
    for flag in ("--model_dir", "--log_dir"):
        argv = ["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"),
                "--log_dir", str(tmp_path / "logs"), *TINY]
        argv[argv.index(flag) + 1] = str(blocker / "sub")
        with pytest.raises(CutPasteError, match=rf"{flag} .*{re.escape(str(Path('a_file', 'sub')))} is not a writable"):
            run_training.main(argv)
    one_model_folder(lid_model, tmp_path / "models")
    with pytest.raises(CutPasteError, match=rf"--out_dir .*{re.escape(str(Path('a_file', 'models')))} is not a wr"):
        eval_script.main(eval_args(mvtec_root, tmp_path / "models", blocker))


def test_strings_read_from_files_never_become_paths(tmp_path, mvtec_root, lid_model):
    outside = tmp_path / "outside"
    for category in (str(outside), "../lid", "a/b"):
        models = tmp_path / "models"
        shutil.rmtree(models, ignore_errors=True)
        one_model_folder(lid_model, models, category=category)
        with pytest.raises(CutPasteError, match=r"holds the category .* which is not a plain name"):
            eval_script.main(eval_args(mvtec_root, models, tmp_path / "Eval"))
    assert not outside.exists()
    args = run_training.get_args_parser().parse_args(["--no-pretrained"])
    state = {"kind": runstate.STATE_KIND, "format": runstate.STATE_FORMAT, "run_name": "../../elsewhere",
             "config": runstate.run_config(args)}
    torch.save(state, tmp_path / "lid.state.pt")
    with pytest.raises(CutPasteError, match=r"holds the run name '../../elsewhere', which is not a plain name"):
        runstate.load_state(tmp_path / "lid.state.pt", args)


def test_a_gaussian_with_nan_is_refused_not_scored(tmp_path, mvtec_root, lid_model):
    ckpt = torch.load(lid_model, weights_only=True)
    ckpt["density"]["precision"][0, 0] = float("nan")
    path = one_model_folder(lid_model, tmp_path / "models", density=ckpt["density"])
    with pytest.raises(CutPasteError, match=r"NaN or infinite"):
        Detector.load(path, device="cpu")
    with pytest.raises(CutPasteError, match=r"NaN or infinite"):
        eval_script.main(eval_args(mvtec_root, tmp_path / "models", tmp_path / "Eval"))
    assert eval_script.main(eval_args(mvtec_root, tmp_path / "models", tmp_path / "Eval", "--density", "torch")) \
        is not None, "refitting the Gaussian from the images is the way out"


def test_two_model_folders_of_one_name_get_their_own_result_folders(tmp_path, mvtec_root, lid_model, capsys):
    folders = [tmp_path / run / "models" for run in ("a", "b")]
    for folder in folders:
        one_model_folder(lid_model, folder)
    for folder in (*folders, folders[0]):
        eval_script.main(eval_args(mvtec_root, folder, tmp_path / "Eval"))
    assert sorted(p.name for p in (tmp_path / "Eval").iterdir()) == ["models", "models-2"]
    for name, folder in zip(("models", "models-2"), folders):
        assert (tmp_path / "Eval" / name / "model_dir.txt").read_text(encoding="utf-8").strip() == str(folder.resolve())
        assert (tmp_path / "Eval" / name / "results.csv").is_file()


def test_an_ensemble_that_mixes_settings_says_so(tmp_path, mvtec_root, lid_model, capsys):
    one_model_folder(lid_model, tmp_path / "models")
    other = tmp_path / "models" / ("x" + lid_model.name)
    ckpt = torch.load(lid_model, weights_only=True)
    torch.save({**ckpt, "variant": "scar", "size": 48, "steps": 3, "created": ckpt["created"] + "1"}, other)
    eval_script.main(eval_args(mvtec_root, tmp_path / "models", tmp_path / "Eval", "--ensemble"))
    assert "note: the ensemble of lid mixes variant normal, scar; size 32, 48; steps 2, 3 (" in capsys.readouterr().out
    # A backbone or head of its own needs weights of its own: the note alone, on the checkpoints' settings.
    base = {"variant": "normal", "size": 32, "steps": 2, "seed": 0, "model": {"arch": "resnet18", "head_layer": 1}}
    for changed, named in (({"model": {"arch": "efficientnet_b0", "head_layer": 1}}, "arch efficientnet_b0, resnet18"),
                           ({"model": {"arch": "resnet18", "head_layer": 2}}, "head_layer 1, 2"),
                           ({"seed": 1}, None)):
        evaluate.note_mixed("lid", [(Path("a.tch"), base), (Path("b.tch"), {**base, **changed})])
        said = capsys.readouterr().out
        assert (f"note: the ensemble of lid mixes {named} (" in said) if named else said == "", "seeds alone: no note"


def test_an_image_over_the_decompression_bomb_limit_is_one_error(tmp_path, mvtec_root, lid_model, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels is over twice the limit: PIL refuses
    with pytest.raises(CutPasteError, match=r"huge.png.*downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS"):
        dataset.load_image(path, 32)
    (result,) = Detector.load(lid_model, device="cpu", runtime="eager").predict([str(path)], threshold=1.0)
    assert result.label == "error" and "MAX_IMAGE_PIXELS" in result.error


class Payload:
    """Unpickling this runs code (it writes a file), as a hostile checkpoint would."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.write_text, (self.target, "code ran")


def test_a_hostile_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "model-lid-x.tch"
    torch.save({"format": 1, "category": "lid", "config": {}, "model": {}, "state_dict": {},
                "density": Payload(target)}, path)
    with pytest.raises(CutPasteError, match=r"cannot read checkpoint .*model-lid-x.tch"):
        checkpoints.read_checkpoint(path)
    with pytest.raises(CutPasteError, match=r"cannot read training state"):
        runstate.load_state(path, run_training.get_args_parser().parse_args([]))
    assert not target.exists()


# Each setting that makes a run, changed from lid_model's (TINY): the setting's name and its value there.
OTHER_RUNS = {"variant": (["--variant", "3way"], "'normal'"), "epochs": (["--epochs", "3"], "2"),
              "batch_size": (["--batch_size", "8"], "4"), "lr": (["--lr", "0.01"], "0.03"),
              "optim": (["--optim", "adam"], "'sgd'"), "arch": (["--arch", "efficientnet_b0"], "'resnet18'"),
              "pretrained": (["--pretrained"], "False"), "freeze_resnet": (["--freeze_resnet", "5"], "20"),
              "head_layer": (["--head_layer", "2"], "1"), "size": (["--size", "48"], "32"),
              "patch_size": (["--patch_size", "16"], "0"), "seed": (["--seed", "1"], "0")}


def test_each_setting_that_makes_a_run_is_compared_by_resume_and_skip(tmp_path, lid_model):
    parse = run_training.get_args_parser().parse_args
    same = parse([*TINY, "--type", "lid"])
    assert runstate.finished_checkpoints(lid_model.parent, same) == {"lid": lid_model}
    state = {"kind": runstate.STATE_KIND, "format": runstate.STATE_FORMAT, "run_name": "model-lid-x",
             "config": runstate.run_config(same)}
    torch.save(state, tmp_path / "lid.state.pt")
    assert set(OTHER_RUNS) == set(runstate.RUN_KEYS)
    for key, (flags, was) in OTHER_RUNS.items():
        other = parse([*TINY, *flags])
        assert runstate.finished_checkpoints(lid_model.parent, other) == {}, f"--{key}: not finished"
        with pytest.raises(CutPasteError, match=rf"other settings: --{key} {re.escape(was)} \(now "):
            runstate.load_state(tmp_path / "lid.state.pt", other)


def test_predict_checks_its_outputs_and_threshold_before_scoring(tmp_path, mvtec_root, lid_model, monkeypatch):
    import predict
    from deploy import detector
    monkeypatch.setattr(detector.Detector, "load", lambda *a, **k: pytest.fail("scoring started"))
    images = str(mvtec_root / "lid" / "test")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for extra, message in ((["--out", str(tmp_path)], r"--out .* is a folder; give a file name"),
                           (["--out", str(blocker / "p.csv")], r"--out .*a_file is not a writable folder"),
                           (["--overlay_dir", str(blocker / "o")],
                            rf"--overlay_dir .*{re.escape(str(Path('a_file', 'o')))} is not a writable"),
                           (["--threshold", "nan"], r"--threshold nan is not a number")):
        with pytest.raises(CutPasteError, match=message):
            predict.main([images, "--checkpoint", str(lid_model), *extra])


def test_predicts_csv_is_replaced_whole_or_not_at_all(tmp_path, mvtec_root, lid_model, disk_fills_at, capsys):
    import predict
    out = tmp_path / "p.csv"
    out.write_text("the previous predictions\n")
    image = str(mvtec_root / "lid" / "test" / "good" / "000.png")
    with disk_fills_at(64), pytest.raises((OSError, CutPasteError)):  # the temporary file stops at 64 bytes
        predict.main([image, "--checkpoint", str(lid_model), "--out", str(out), "--device", "cpu",
                      "--runtime", "eager"])
    assert out.read_text() == "the previous predictions\n" and [p.name for p in tmp_path.iterdir()] == ["p.csv"]
    predict.main([image, "--checkpoint", str(lid_model), "--out", str(out), "--device", "cpu",
                  "--runtime", "eager"])
    assert pd.read_csv(out)["path"].tolist() == [image]


def test_nan_weights_are_refused_at_load(tmp_path, lid_model):
    ckpt = torch.load(lid_model, weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key].view(-1)[0] = float("nan")
    path = one_model_folder(lid_model, tmp_path / "models", state_dict=ckpt["state_dict"])
    with pytest.raises(CutPasteError, match=rf"NaN or infinite weights \({key}\)"):
        Detector.load(path, device="cpu")


def test_the_truth_from_folders_knows_every_layouts_clean_folder():
    from deploy.prediction import folder_truth
    assert [folder_truth(p) for p in ("a/test/good/1.png", "v/Data/Images/Normal/1.JPG", "a/test/crack/1.png",
                                      "v/Data/Images/Anomaly/1.JPG", "b/test_public/bad/1.png")] == [0, 0, 1, 1, 1]
