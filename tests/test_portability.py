"""Windows, macOS and Apple GPUs, shown on Linux: each test fakes the one thing that differs there (a module that
does not exist, a path class, a case-insensitive disk, an MPS tensor, os.name) and runs the project's own code."""
import argparse
import gc
import importlib
import ntpath
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path, PureWindowsPath

import pandas as pd
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

import dataset
import density
from storage import files
from deploy import overlays
from evaluation import evaluate
from reproduction import grid
from storage import checkpoints, download
from training import devices, runstate
from common.errors import CutPasteError

ROOT = Path(__file__).resolve().parents[1]

# Run in a child whose fcntl and resource cannot be imported, whose locale writes ASCII only (PYTHONUTF8=0 under the
# C locale: as a Windows code page, it cannot write every character) and whose os.linesep is Windows' "\r\n", which
# pandas ends CSV rows with: every module imports; a tiny training, eval and predict run and write their files.
_WINDOWS_LIKE = r"""
import importlib, importlib.util, os, sys, warnings
from pathlib import Path
sys.modules["fcntl"] = sys.modules["resource"] = None
os.linesep = "\r\n"
root, data, out = (Path(arg) for arg in sys.argv[1:4])
sys.path[:0] = [str(root), str(root / "tools")]
warnings.simplefilter("ignore")  # filelock says it falls back to a soft lock: on Windows it has its own
packages = [p.parent for p in root.glob("*/__init__.py")]
for path in sorted([*root.glob("*.py"), *(m for pkg in packages for m in pkg.glob("*.py")), *root.glob("tools/*.py"),
                    *root.glob("tests/test_*.py")]):
    if path.parent.name == "tests":
        spec = importlib.util.spec_from_file_location(path.stem, path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    elif path.parent in packages:
        importlib.import_module(path.parent.name + ("" if path.stem == "__init__" else f".{path.stem}"))
    else:
        importlib.import_module(path.stem)  # a script at the root, or a tool (tools/ is on sys.path)
import eval as eval_script, flags_doc, pandas, predict, run_training
from storage import files
(ckpt,) = run_training.main(["--data_dir", str(data), "--type", "lid", "--model_dir", str(out / "m"), "--log_dir",
                             str(out / "logs"), "--size", "32", "--epochs", "2", "--batch_size", "4",
                             "--no-pretrained", "--workers", "0", "--variant", "normal", "--log_every", "1"])
eval_script.main(["--data_dir", str(data), "--type", "lid", "--model_dir", str(out / "m"), "--out_dir",
                  str(out / "e"), "--save_plots", "0", "--workers", "0"])
predict.main([str(data / "lid" / "test" / "good"), "--checkpoint", str(ckpt), "--out", str(out / "p.csv"),
              "--device", "cpu"])
files.write_csv(pandas.DataFrame({"defect": ["crack\u2013edge"]}), out / "u.csv")
print("flags doc read:", flags_doc.main(["--check"]))
"""


def test_a_windows_like_process_imports_everything_trains_and_writes_utf8_lf(tmp_path, mvtec_root):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    res = subprocess.run([sys.executable, "-c", _WINDOWS_LIKE, str(ROOT), str(mvtec_root), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace",
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "flags doc read: 0" in res.stdout, "doc/flags.md ('–') is read as UTF-8 in an ASCII locale"
    written = [tmp_path / "m" / "train_results.csv", tmp_path / "m" / "train_results.md",
               tmp_path / "e" / "m" / "results.csv", tmp_path / "e" / "m" / "results.md", tmp_path / "p.csv",
               tmp_path / "u.csv"]
    for path in written:
        assert b"\r" not in path.read_bytes(), f"{path.name}: lines end in '\\n' on every system"
    assert (tmp_path / "u.csv").read_bytes() == "defect\ncrack\u2013edge\n".encode("utf-8")


def test_the_category_lock_refuses_a_second_holder_at_once_and_is_dropped_after(tmp_path):
    with runstate.category_lock(tmp_path, "lid"):
        started = time.perf_counter()
        with pytest.raises(CutPasteError, match=r"another training of lid is writing into .*lid\.lock"):
            with runstate.category_lock(tmp_path, "lid"):
                pytest.fail("a second holder got the lock")
        assert time.perf_counter() - started < 1.0, "refused at once, not after a wait"
    with runstate.category_lock(tmp_path, "lid"):
        pass  # released when the first holder left


# --- Apple GPUs (MPS) ---------------------------------------------------------------------------------------------

class FakeMPSTensor(torch.Tensor):
    """A CPU tensor that says it lives on Apple's GPU and, as tensors there do, refuses float64."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:
            return torch.device("mps")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if any(isinstance(o, torch.Tensor) and o.dtype == torch.float64 for o in (out if isinstance(out, tuple)
                                                                                else (out,))):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64. Please use float32 instead.")
        return torch._tensor._convert(out, cls)


class OnFakeMPS(TorchFunctionMode):
    """.to('mps') gives a FakeMPSTensor and .to('cpu') or .cpu() a plain tensor, for any tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            rest = [a for a in args[1:] if not isinstance(a, (str, torch.device))]
            named = [torch.device(a) for a in args[1:] if isinstance(a, (str, torch.device))]
            target = torch.device("cpu") if func == torch.Tensor.cpu else torch.device(kwargs.pop("device", None)
                                                                                     or (named or ["cpu"])[0])
            plain = args[0].as_subclass(torch.Tensor)
            plain = plain.to(*rest, **kwargs) if func == torch.Tensor.to else plain
            return plain.as_subclass(FakeMPSTensor) if target.type == "mps" else plain
        return func(*args, **kwargs)


def test_auto_takes_an_apple_gpu_and_mps_is_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(CutPasteError, match=r"--device mps asked for an Apple GPU \(MPS\), but torch sees none"):
        devices.resolve_device("mps")


def test_bf16_is_not_claimed_for_mps_from_the_host_cpus_flags(monkeypatch):
    monkeypatch.delenv(devices.NO_BF16_ENV, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)  # a host CPU with bf16
    assert devices.bf16_supported(torch.device("cpu")) is True
    assert devices.bf16_supported(torch.device("mps")) is False
    args = argparse.Namespace(amp=None, channels_last=None)
    devices.choose(args, torch.device("mps"))
    assert (args.amp, args.channels_last) == (False, False)


def test_the_gaussian_is_fitted_where_float64_exists_and_kept_on_the_gpu():
    embeds = density.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)))
    with OnFakeMPS():
        on_gpu = embeds.to("mps")
        with pytest.raises(TypeError, match="float64"):
            on_gpu.double()  # the fake refuses what MPS refuses
        fitted = density.GaussianDensityTorch().fit(on_gpu)
        heldout = density.heldout_scores(on_gpu)
    reference = density.GaussianDensityTorch().fit(embeds)
    assert fitted.precision.device.type == "mps" and fitted.mean.device.type == "mps"
    assert torch.equal(fitted.precision.as_subclass(torch.Tensor), reference.precision), "the CPU's float64 fit"
    assert torch.equal(heldout.as_subclass(torch.Tensor), density.heldout_scores(embeds))


@pytest.fixture
def benchmark_tool(monkeypatch):
    """tools/benchmark.py (not named `benchmark`: pytest-benchmark, where installed, owns that fixture)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    return importlib.import_module("benchmark")


def test_the_tools_wait_for_an_apple_gpu_before_reading_the_clock(monkeypatch, benchmark_tool):
    waits = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: waits.append(1))
    benchmark_tool.timed_in_turn([lambda: None], torch.device("mps"), steps=2, warmup=1)
    assert len(waits) == 6, "before and after each of the 3 calls"


# --- Replacing files, text ----------------------------------------------------------------------------------------

def test_text_is_utf8_with_lf_whatever_the_system_writes_by_default(tmp_path, monkeypatch):
    opened, real = [], os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", **kw: opened.append(kw) or real(fd, mode, **kw))
    monkeypatch.setattr(os, "linesep", "\r\n")  # what pandas ends rows with on Windows
    files.write_csv(pd.DataFrame({"path": ["C:\\donn\u00e9es\\a.png"], "score": [1.5]}), tmp_path / "p.csv")
    assert opened == [{"encoding": "utf-8", "newline": "\n"}], "not the locale's encoding, no newline translation"
    assert (tmp_path / "p.csv").read_bytes() == "path,score\nC:\\donn\u00e9es\\a.png,1.5\n".encode("utf-8")


def test_a_file_held_open_elsewhere_is_retried_then_named(tmp_path, monkeypatch):
    target = tmp_path / "predictions.csv"
    target.write_text("old\n")
    real_replace, refused = os.replace, []

    def held_for_two_tries(src, dst):
        if len(refused) < 2:
            refused.append(dst)
            raise PermissionError(13, "Access is denied")  # Windows, while Excel has the file open
        real_replace(src, dst)
    monkeypatch.setattr(files, "REPLACE_WAITS_S", (0.0,) * 5)
    monkeypatch.setattr(os, "replace", held_for_two_tries)
    files.atomic_write(target, lambda fh: fh.write("new\n"), "w")
    assert target.read_text() == "new\n" and len(refused) == 2

    def held(src, dst):
        raise PermissionError(13, "Access is denied")
    monkeypatch.setattr(os, "replace", held)
    with pytest.raises(CutPasteError, match=r"cannot replace .*predictions\.csv: another program holds it open") \
            as err:
        files.atomic_write(target, lambda fh: fh.write("newer\n"), "w")
    assert isinstance(err.value, OSError), "callers that go on after a failed write still catch it"
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux lists a process's mapped files in /proc")
def test_checkpoints_are_mapped_only_where_a_mapped_file_can_be_replaced(tmp_path, monkeypatch):
    path = tmp_path / "model-lid-x.tch"

    def save(value):
        files.atomic_save({"format": checkpoints.CHECKPOINT_FORMAT, "category": "lid", "config": {},
                                 "model": {}, "state_dict": {"w": torch.full((4096,), value)}, "density": {}}, path)

    def mapped() -> bool:
        return str(path) in Path("/proc/self/maps").read_text()
    save(1.0)
    ckpt = checkpoints.read_checkpoint(path)
    assert mapped(), "here only the tensors used are read"
    save(2.0)  # replacing a mapped file works on Linux: the mapping keeps the old data
    assert float(ckpt["state_dict"]["w"][0]) == 1.0
    del ckpt
    gc.collect()
    with monkeypatch.context() as windows:
        windows.setattr(os, "name", "nt")
        ckpt = checkpoints.read_checkpoint(path)
    assert not mapped() and float(ckpt["state_dict"]["w"][0]) == 2.0, "read, not mapped, where it would pin the file"


# --- Names read from files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["C:x", "a:b", "CON", "nul", "Com1", "lpt9.txt", "aux.tch", "lid.", "lid ",
                                  "a?b", "a*b", 'a"b', "a<b", "a|b", "tab\there"])
def test_names_windows_reads_as_drives_or_devices_are_refused(tmp_path, name):
    with pytest.raises(CutPasteError, match="which is not a plain name"):
        files.plain_name(name, "the category", tmp_path / "model.tch")


def test_plain_names_pass_and_why_a_drive_is_not_one():
    for name in ("lid", "metal_nut", "console", "com10", "con_rod", "nul-x", "\u00e9t\u00e9"):
        assert files.plain_name(name, "the category", Path("model.tch")) == name
    out = PureWindowsPath(r"C:\Eval")
    assert not (out / "D:x").is_relative_to(out), "joined to a folder, a drive-relative name leaves it"


# --- Order and case -----------------------------------------------------------------------------------------------

def test_images_are_ordered_by_their_text_not_by_the_path_class(tmp_path, monkeypatch):
    folder = tmp_path / "widget"
    names = ["B.png", "a.png", "C.png", "d.png", "E.png", "f.png"]
    for sub, name in [("good", n) for n in names] + [("Zcrack", "x.png")]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(folder / sub / name)
    # WindowsPath orders case-insensitively; played here by PosixPath, so sorting paths themselves would show it.
    monkeypatch.setattr(type(folder), "__lt__", lambda a, b: str(a).casefold() < str(b).casefold())
    assert [p.name for p in dataset._images_in(folder / "good")] == sorted(names)
    train, held = dataset._folder_split(folder)  # which images are held out follows from that order
    assert train == sorted(train, key=str) and held == sorted(held, key=str) and len(held) == 1
    items = dataset.list_test_items(tmp_path, "widget")
    assert [str(it.path) for it in items] == sorted(str(it.path) for it in items)
    assert items[0].defect == "Zcrack", "'Z' sorts before 'g' by the text"


def spelled_on_disk(path: str, root: str) -> str:
    """`path` below `root` with each name as the disk spells it, matched in any case."""
    found = root
    for part in os.path.relpath(path, root).split(os.sep):
        try:
            names = os.listdir(found)
        except OSError:
            names = []
        found = os.path.join(found, part if part in names else next(
            (n for n in names if n.casefold() == part.casefold()), part))
    return found


@pytest.fixture
def case_insensitive(monkeypatch):
    """Make os.stat (and so exists, is_dir, samefile) below a folder find names in any case, as the default disks
    of macOS and Windows do; returns the function that takes the folder."""
    real_stat = os.stat

    def below(root: Path):
        root = str(root)

        def stat(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and not isinstance(os.fspath(path), bytes):
                text = os.path.abspath(path)
                if text.startswith(root + os.sep):
                    path = spelled_on_disk(text, root)
            return real_stat(path, *args, **kwargs)
        monkeypatch.setattr(os, "stat", stat)
    return below


def test_a_type_spelled_otherwise_than_its_folder_is_refused(layout_roots, mvtec_root, case_insensitive):
    root = layout_roots["visa"]
    case_insensitive(root)
    assert (root / "Lid").is_dir(), "the fake disk opens lid/ as Lid/"
    with pytest.raises(CutPasteError, match=r"--type Lid: the folder in .* is spelled 'lid'; give --type lid"):
        dataset.list_train_images(root, "Lid")  # else VisA's table knows no object 'Lid': 0 images
    assert len(dataset.list_train_images(root, "lid")) == 10


def test_one_model_folder_spelled_two_ways_keeps_one_results_folder(tmp_path, case_insensitive):
    (tmp_path / "runs" / "models").mkdir(parents=True)
    case_insensitive(tmp_path)
    first = evaluate.results_folder(argparse.Namespace(model_dir=tmp_path / "runs" / "models",
                                                         out_dir=tmp_path / "Eval"))
    again = evaluate.results_folder(argparse.Namespace(model_dir=tmp_path / "Runs" / "models",
                                                         out_dir=tmp_path / "Eval"))
    assert first == again == tmp_path / "Eval" / "models", "the same folder, not a second 'models-2'"


def test_an_overlay_on_an_input_spelled_otherwise_is_refused(tmp_path, case_insensitive):
    photos = tmp_path / "Photos"
    photos.mkdir()
    inputs = [photos / "a.png", photos / "a.png.overlay.png"]  # a rerun: an earlier overlay is among the inputs
    for path in inputs:
        Image.new("RGB", (4, 4)).save(path, format="PNG")
    case_insensitive(tmp_path)
    with pytest.raises(CutPasteError, match=r"a\.png\.overlay\.png, which is one of the inputs"):
        overlays.overlay_paths(inputs, tmp_path / "photos")


def test_overlays_of_inputs_on_several_drives_mirror_each_drive():
    same = [PureWindowsPath(r"C:\data\good\a.png"), PureWindowsPath(r"c:\DATA\bad\b.png")]
    assert overlays.mirrored(same) == [PureWindowsPath(r"good\a.png"), PureWindowsPath(r"bad\b.png")]
    with pytest.raises(ValueError):
        ntpath.commonpath([r"C:\data", r"D:\photos"])  # what os.path.commonpath does there
    drives = [PureWindowsPath(r"C:\data\a.png"), PureWindowsPath(r"D:\photos\a.png"),
              PureWindowsPath(r"\\server\share\a.png")]
    assert overlays.mirrored(drives) == [PureWindowsPath(r"C\data\a.png"), PureWindowsPath(r"D\photos\a.png"),
                                         PureWindowsPath(r"servershare\a.png")]


# --- Linked data --------------------------------------------------------------------------------------------------

def test_a_visa_object_linked_in_from_another_disk_is_read(tmp_path, layout_roots):
    source = layout_roots["visa"]
    elsewhere = tmp_path / "disk2" / "lid_images"  # another disk, another name
    dataset_root = tmp_path / "visa"
    shutil.copytree(source / "lid", elsewhere)
    (dataset_root / "split_csv").mkdir(parents=True)
    shutil.copy(source / "split_csv" / "1cls.csv", dataset_root / "split_csv")
    (dataset_root / "lid").symlink_to(elsewhere, target_is_directory=True)
    assert dataset.present_categories(dataset_root) == ["lid"]
    assert dataset.present_categories(dataset_root / "lid") == ["lid"]
    train = dataset.list_train_images(dataset_root, "lid")
    assert len(train) == 10 and all(p.is_relative_to(dataset_root / "lid") for p in train)
    assert len(dataset.list_test_items(dataset_root / "lid", "lid")) == 7
    assert dataset.list_train_images(dataset_root / "lid", "lid") == train


# --- Smaller ones -------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGWINCH"), reason="needs a signal whose default is to be ignored")
def test_ctrl_break_asks_training_to_stop_where_the_system_has_it(monkeypatch):
    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGWINCH, raising=False)  # Windows' Ctrl-Break, played by a
    before = signal.getsignal(signal.SIGWINCH)                               # signal Linux ignores by default
    with runstate.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGWINCH)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
    assert stop.requested and signal.getsignal(signal.SIGWINCH) == before


def test_the_benchmark_runs_without_linux_only_calls(monkeypatch, benchmark_tool):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(benchmark_tool.shutil, "which", lambda name: None)  # no lscpu
    monkeypatch.setattr(benchmark_tool, "cpuinfo", lambda: {})  # no /proc/cpuinfo
    peak, how = benchmark_tool.machine_peak()
    assert peak == 0 and "no clock known" in how
    for platform, maxrss in (("darwin", 3 << 30), ("linux", 3 << 20)):  # bytes on macOS, KiB on Linux
        usage = types.SimpleNamespace(getrusage=lambda who, m=maxrss: types.SimpleNamespace(ru_maxrss=m),
                                      RUSAGE_SELF=0)
        monkeypatch.setitem(sys.modules, "resource", usage)
        monkeypatch.setattr(sys, "platform", platform)
        assert benchmark_tool.peak_rss_mib() == 3072, platform
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows
    assert benchmark_tool.peak_rss_mib() != benchmark_tool.peak_rss_mib(), "NaN: unknown"


def test_an_archive_member_on_another_drive_is_refused_not_a_traceback(tmp_path, monkeypatch):
    def across_drives(paths):
        raise ValueError("Paths don't have the same drive")  # Windows' os.path.commonpath for C:\ and D:\
    monkeypatch.setattr(os.path, "commonpath", across_drives)
    member = tarfile.TarInfo("D:x")
    with pytest.raises(CutPasteError, match=r"refused member 'D:x' .* outside"):
        download.check_member(member, tmp_path, tmp_path / "a.tar.xz")


def test_train_args_keep_windows_backslashes(monkeypatch):
    text = r'--data_dir C:\data\mvtec --log_dir "C:\my runs\logs"'
    assert grid.split_args(text) == shlex.split(text), "POSIX rules here"
    with monkeypatch.context() as windows:
        windows.setattr(os, "name", "nt")
        words = grid.split_args(text)
    assert words == ["--data_dir", r"C:\data\mvtec", "--log_dir", r"C:\my runs\logs"]
