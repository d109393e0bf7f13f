"""Interruptions: periodic states, --resume (bit-identical on the CPU), Ctrl-C, failed and finished categories."""
import errno
import functools
import json
import os
import shutil
import signal
import threading
import warnings

import pandas as pd
import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

import run_training
from common.errors import CutPasteError
from storage import checkpoints as engine
from storage import files
from training import loop, records, runstate
from training.devices import make_generator
from training.pretrained import weights_cache_path

# On the CPU, whatever the machine has: resumed runs are compared bit for bit.
TINY = ["--size", "32", "--epochs", "6", "--batch_size", "4", "--log_every", "2", "--workers", "0",
        "--save_every", "2", "--device", "cpu"]


def train(root, data, *extra):
    return run_training.main(["--data_dir", str(data), "--model_dir", str(root / "models"),
                              "--log_dir", str(root / "logdirs"), *TINY, *extra])


@pytest.fixture
def offline_imagenet(tmp_path, monkeypatch):
    """A torchvision weights cache holding random ResNet18 weights, so --pretrained (and its freeze) runs offline."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    path = weights_cache_path(ResNet18_Weights.IMAGENET1K_V1)
    path.parent.mkdir(parents=True)
    torch.save(resnet18(weights=None).state_dict(), path)


def fail_at_call(monkeypatch, n, action):
    """Make loop.train_step run `action` just before its n-th call (1-based); return the real one."""
    real, calls = loop.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            action()
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "train_step", step)
    return real


def same_checkpoints(a, b):
    ca, cb = engine.read_checkpoint(a), engine.read_checkpoint(b)
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), key
    for key in ("mean", "precision"):
        assert torch.equal(ca["density"][key], cb["density"][key])
    assert torch.equal(ca["train_scores"], cb["train_scores"])
    assert torch.equal(ca["heldout_scores"], cb["heldout_scores"])


def test_crash_then_resume_equals_uninterrupted_run(tmp_path, mvtec_root, monkeypatch, offline_imagenet):
    # Pretrained with a 3-step frozen backbone: the crash after the state at step 2 resumes frozen,
    # with momentum buffers for the head only, and unfreezes at step 3 as the uninterrupted run does.
    extra = ["--type", "lid", "--variant", "3way", "--freeze_resnet", "3"]
    (reference,) = train(tmp_path / "a", mvtec_root, *extra)
    assert not runstate.state_path(tmp_path / "a" / "models", "lid").exists(), "a finished run drops its state"

    def crash():
        raise RuntimeError("simulated crash")
    real_step = fail_at_call(monkeypatch, 4, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tmp_path / "b", mvtec_root, *extra)
    state = torch.load(runstate.state_path(tmp_path / "b" / "models", "lid"), weights_only=True)
    assert state["step"] == 2 and not list((tmp_path / "b" / "models").glob("*.tch"))
    monkeypatch.setattr(loop, "train_step", real_step)
    (resumed,) = train(tmp_path / "b", mvtec_root, *extra, "--resume")
    assert resumed.name.startswith(state["run_name"])
    same_checkpoints(reference, resumed)

    run_dir = tmp_path / "b" / "logdirs" / state["run_name"]
    losses = [r["step"] for r in records.read_scalars(run_dir) if r["tag"] == "loss"]
    assert losses == list(range(6)), "each step logged once, the crashed session's tail dropped"
    sessions = json.loads((run_dir / "run.json").read_text())["sessions"]
    assert [s["start_step"] for s in sessions] == [0, 2]
    assert sessions[0]["code_version"] and sessions[0]["libraries"]["torch"] == torch.__version__.split("+")[0]
    args = json.loads((run_dir / "args.json").read_text())
    assert list(args) == sorted(args) and args["variant"] == "3way"
    assert list(run_dir.glob("events.out.tfevents.*")), "tensorboard events beside the records"


def test_ctrl_c_saves_exits_and_resumes_identically(tmp_path, mvtec_root, monkeypatch):
    extra = ["--type", "cap", "--variant", "scar", "--no-pretrained", "--save_every", "0"]
    (reference,) = train(tmp_path / "a", mvtec_root, *extra)
    handlers = {sig: signal.getsignal(sig) for sig in runstate.stop_signals()}
    fail_at_call(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit) as stopped:
        train(tmp_path / "b", mvtec_root, *extra)
    assert stopped.value.code == 130
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, "the previous handlers are restored"
    state = torch.load(runstate.state_path(tmp_path / "b" / "models", "cap"), weights_only=True)
    assert state["step"] == 3, "the step in flight completes, then the state is saved"
    monkeypatch.undo()
    (resumed,) = train(tmp_path / "b", mvtec_root, *extra, "--resume")
    same_checkpoints(reference, resumed)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="POSIX signals")
@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGTERM)])
def test_a_signal_asks_to_stop_after_the_step_and_a_second_aborts_at_once(first, second, capsys):
    # Sent to the main thread, a signal's Python handler runs before pthread_kill returns. Handlers of the test's
    # own stand in around it, so that a signal StopRequest misses is seen here instead of ending pytest.
    send = functools.partial(signal.pthread_kill, threading.main_thread().ident)
    missed = []

    def outside(signum, frame):
        missed.append(signum)
    previous = {sig: signal.signal(sig, outside) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with runstate.StopRequest() as stop:
            assert not stop.requested
            send(first)
            assert stop.requested, "the training loop saves and stops at its next step"
            with pytest.raises(KeyboardInterrupt):
                send(second)
        assert not missed and all(signal.getsignal(sig) is outside for sig in previous), "handlers restored"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert f"{first.name}: saving the training state after this step" in capsys.readouterr().err


def test_failed_category_keeps_the_others_and_finished_ones_are_skipped(tmp_path, mvtec_root):
    data = tmp_path / "data"
    shutil.copytree(mvtec_root, data)
    bad = data / "lid" / "train" / "good" / "002.png"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:50])
    models = tmp_path / "models"
    fast = ["--no-pretrained", "--variant", "normal", "--epochs", "2"]  # this test is about the bookkeeping
    with pytest.raises(CutPasteError, match=r"1 of 2 categories failed: lid \(cannot read image .*002.png"):
        train(tmp_path, data, *fast)
    table = pd.read_csv(models / "train_results.csv")
    assert list(table["category"]) == ["cap", "lid"] and list(table["status"]) == ["trained", "failed"]
    (cap,) = models.glob("model-cap-*.tch")
    bad.write_bytes(good_bytes)
    paths = train(tmp_path, data, *fast)
    assert cap in paths and list(models.glob("model-cap-*.tch")) == [cap], "cap skipped, not retrained"
    assert list(pd.read_csv(models / "train_results.csv")["status"]) == ["skipped", "trained"]
    assert train(tmp_path, data, *fast, "--type", "cap", "--resume") == [cap]
    other = run_training.get_args_parser().parse_args(["--epochs", "3", "--no-pretrained", "--variant", "normal",
                                                       "--size", "32", "--batch_size", "4"])
    assert runstate.finished_checkpoints(models, other) == {}, "other settings are another run"
    train(tmp_path, data, *fast, "--type", "cap", "--resume", "--retrain")
    assert len(list(models.glob("model-cap-*.tch"))) == 2, "--retrain trains a finished category again"


def make_state(args, device=torch.device("cpu")):
    model = engine.build_model(args.head_layer, 2)
    opt, sched = loop.make_optimizer(model, args, args.epochs)
    return runstate.capture(3, "model-lid-x", "lid", args, model, opt, sched, make_generator(device, 0),
                            device), model, opt, sched


def test_bad_states_get_clear_errors(tmp_path):
    args = run_training.get_args_parser().parse_args(["--epochs", "8", "--no-pretrained"])
    state, model, opt, sched = make_state(args)
    path = tmp_path / "lid.state.pt"
    torch.save(state, path)
    assert runstate.load_state(path, args)["step"] == 3
    other = run_training.get_args_parser().parse_args(["--epochs", "9", "--no-pretrained", "--lr", "0.1"])
    with pytest.raises(CutPasteError, match=r"other settings: --epochs 8 \(now 9\), --lr 0.03 \(now 0.1\)"):
        runstate.load_state(path, other)
    with pytest.raises(CutPasteError, match="saved on cuda, this run is on cpu"):
        runstate.restore({**state, "device_type": "cuda"}, path, model, opt, sched, make_generator(
            torch.device("cpu"), 0), torch.device("cpu"))
    torch.save({**state, "format": runstate.STATE_FORMAT + 1}, path)
    with pytest.raises(CutPasteError, match=f"state format {runstate.STATE_FORMAT + 1}, this code reads"):
        runstate.load_state(path, args)
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CutPasteError, match="not a training state"):
        runstate.load_state(path, args)
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CutPasteError, match=r"lid.state.pt .*truncated: delete .* or drop --resume"):
        runstate.load_state(path, args)
    assert runstate.load_state(tmp_path / "none.state.pt", args) is None


def test_full_disk_during_a_state_write_keeps_the_previous_state(tmp_path, disk_fills_at):
    args = run_training.get_args_parser().parse_args(["--epochs", "8", "--no-pretrained"])
    state, *_ = make_state(args)
    path = tmp_path / "lid.state.pt"
    assert runstate.save_state(state, path)
    with disk_fills_at(1 << 20), warnings.catch_warnings(record=True) as caught:  # 1 MiB of the 45 MB state
        warnings.simplefilter("always")
        assert not runstate.save_state({**state, "step": 6}, path)
    (message,) = [str(w.message) for w in caught]
    assert "File too large" in message and "previous state is intact" in message
    assert runstate.load_state(path, args)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file left behind"


def test_full_disk_at_the_final_checkpoint_keeps_the_trained_state(tmp_path, mvtec_root, monkeypatch):
    extra = ["--type", "cap", "--variant", "normal", "--no-pretrained", "--epochs", "2"]

    def disk_full(ckpt, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "atomic_save", disk_full)
    with pytest.raises(CutPasteError, match=r"could not write checkpoint .*No space left.*rerun with --resume"):
        train(tmp_path, mvtec_root, *extra)
    state_file = runstate.state_path(tmp_path / "models", "cap")
    assert torch.load(state_file, weights_only=True)["step"] == 2
    monkeypatch.undo()
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: pytest.fail("trained again"))
    (path,) = train(tmp_path, mvtec_root, *extra, "--resume")
    assert engine.read_checkpoint(path)["steps"] == 2 and not state_file.exists()


def test_a_category_with_one_training_image_fails_clearly_and_the_others_train(tmp_path, mvtec_root):
    data = tmp_path / "data"
    shutil.copytree(mvtec_root, data)
    for extra in sorted((data / "cap" / "train" / "good").glob("*.png"))[1:]:
        extra.unlink()  # one clean image: no covariance to estimate
    with pytest.raises(CutPasteError, match=r"1 of 2 categories failed: cap \(cannot fit a Gaussian.*train/good"):
        train(tmp_path, data, "--no-pretrained", "--variant", "normal", "--epochs", "2")
    table = pd.read_csv(tmp_path / "models" / "train_results.csv")
    assert list(table["status"]) == ["failed", "trained"], "lid is still trained and the table written"
    assert runstate.state_path(tmp_path / "models", "cap").exists(), "the trained steps are kept"


def test_a_learning_rate_that_is_not_positive_is_refused(tmp_path, mvtec_root):
    with pytest.raises(CutPasteError, match="--lr -1.0 is out of range"):
        train(tmp_path, mvtec_root, "--no-pretrained", "--lr", "-1")
