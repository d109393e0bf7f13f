"""Smoke runs of the developer tools in tools/ on tiny inputs; no timing is asserted beyond being positive."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_inference  # noqa: E402
import benchmark  # noqa: E402
import eval as eval_script  # noqa: E402


def test_benchmark_writes_its_table(tmp_path, mvtec_root, monkeypatch):
    # A fresh `python eval.py` costs most of this test (starting Python and importing torch), and test_scripts.py
    # runs that command already; here its command line is checked: the script, and flags that eval.py accepts.
    commands = []

    def run_command(cmd):
        assert cmd[:2] == [sys.executable, str(ROOT / "eval.py")]
        eval_script.get_args_parser().parse_args(cmd[2:])
        commands.append(cmd)

    monkeypatch.setattr(benchmark, "run_command", run_command)
    out = tmp_path / "bench.md"
    rows = benchmark.main(["--data_dir", str(mvtec_root), "--type", "lid", "--size", "32", "--batch_size", "4",
                           "--steps", "1", "--warmup", "1", "--ref_workers", "0", "--workers", "0",
                           "--eval_repeats", "1", "--device", "cpu", "--out", str(out)])
    for key in ("ours: augmentation img/s", "ours: model step img/s", "ours fp32 NCHW: model step img/s",
                "ours: end-to-end img/s", "reference: end-to-end img/s", "speed-up end-to-end (ours / reference)",
                "model step speed-up (ours' settings / fp32 NCHW)",
                "ours: pipeline efficiency (model step / end-to-end time)",
                "ours: model step GFLOP (forward + backward)", "ours: model step GFLOP/s", "ours: eval in-process s",
                "ours: eval command s (python eval.py, plots on)", "reference: eval in-process s",
                "speed-up eval in-process (reference / ours)", "peak RSS MiB"):
        assert rows[key] > 0, key
    # Where the system reports no clock (many aarch64 kernels) the peak is 0 and the fraction of it NaN.
    peak, fraction = rows["machine peak GFLOP/s"], rows["ours: model step fraction of machine peak"]
    assert peak >= 0 and (math.isnan(fraction) if peak == 0 else
                          fraction == pytest.approx(rows["ours: model step GFLOP/s"] / peak))
    assert len(commands) == 1
    assert "FLOP/cycle" in rows["machine peak formula"] and "MHz" in rows["machine peak formula"]
    text = out.read_text()
    assert "Machine: " in text and "CPU capability" in text and "torch " in text
    for key in rows:
        assert f"| {key} |" in text, key


def test_bench_inference_times_every_runtime_on_the_same_graphs(tmp_path, capsys):
    out = tmp_path / "inference.md"
    rows = bench_inference.main(["--size", "32", "--patch_size", "16", "--stride", "8", "--batch", "2",
                                 "--patch_batch", "4", "--iters", "1", "--device", "cpu", "--out", str(out)])
    names = [r["runtime"] for r in rows]
    assert names[:2] == ["eager NCHW float32", "eager channels-last float32"] and names[-2:] == [
        "onnxruntime float32", "openvino float32"]
    for row in rows:
        assert row["256: images/s"] > 0 and row["patch: images/s"] > 0 and row["dense: s per image"] > 0, row
    text = out.read_text()
    assert "Machine: " in text and "avx2 " in text and "| onnxruntime float32 |" in text
    assert "dense: s per image" in text


def test_gpu_checks_script_parses_and_names_files_that_exist():
    # Running it costs minutes on the CPU; a parse and the paths it names catch what a move of files breaks.
    script = ROOT / "tools" / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = set(re.findall(r"[\w./-]+\.(?:py|sh)\b", script.read_text()))
    assert {"tests/test_cudagraphs.py", "tools/benchmark.py", "tools/bench_inference.py", "run_training.py",
            "eval.py", "tools/gpu_checks.sh"} <= named
    for name in named:
        assert (ROOT / name).is_file(), f"gpu_checks.sh names {name}, which does not exist"
