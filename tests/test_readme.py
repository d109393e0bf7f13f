"""The README documents every flag of every script."""
from pathlib import Path

import pytest

import benchmark
import dataset
import bench_localization
import demo
import demo_data
import eval as eval_script
import figures
import predict
import reproduce
import run_training

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


@pytest.mark.parametrize("module", [run_training, eval_script, demo, demo_data, benchmark, reproduce, figures,
                                    dataset, predict, bench_localization])
def test_every_flag_is_documented(module):
    for action in module.get_args_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in README or f"`{flag} " in README, f"{module.__name__}: {flag} not in README"
