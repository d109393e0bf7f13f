"""torchrun on the CPU: two gloo processes on loopback shard two categories; rank 0 writes one table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from storage import checkpoints as engine
from training import distributed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "32", "--epochs", "4", "--batch_size", "4", "--no-pretrained", "--log_every", "2",
        "--workers", "0", "--variant", "normal", "--device", "cpu"]


def test_two_ranks_train_two_categories_into_one_table(tmp_path, mvtec_root):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "run_training.py"), "--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"),
           "--log_dir", str(tmp_path / "logdirs"), *TINY]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "rank 0 of 2: training cap" in res.stdout and "rank 1 of 2: training lid" in res.stdout
    assert res.stdout.count("training results") == 1, "only rank 0 writes the table"
    table = pd.read_csv(tmp_path / "models" / "train_results.csv")
    assert list(table["category"]) == ["cap", "lid"] and list(table["rank"]) == [0, 1]
    assert list(table["status"]) == ["trained", "trained"]
    for cat, ckpt_path in zip(table["category"], table["checkpoint"]):
        assert engine.read_checkpoint(Path(ckpt_path))["category"] == cat
    (lid_run,) = (tmp_path / "logdirs").glob("model-lid-*")
    session = json.loads((lid_run / "run.json").read_text())["sessions"][0]
    assert (session["rank"], session["world_size"]) == (1, 2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_cover_every_category_once(world_size):
    cats = ["a", "b", "c", "d", "e"]
    shards = [distributed.shard(cats, distributed.World(r, world_size, r)) for r in range(world_size)]
    assert sorted(c for s in shards for c in s) == cats
    assert shards[0][0] == "a"
