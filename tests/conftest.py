"""Fixtures: small seeded synthetic MVTec-layout folders, made fresh for each test session."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from support import demo_data  # noqa: E402


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """A data root with two tiny categories, 'lid' and 'cap' (32 px)."""
    root = tmp_path_factory.mktemp("mvtec")
    demo_data.make_dataset(root, "lid", size=32, n_train=16, n_test_good=4, n_test_per_defect=2, seed=1)
    demo_data.make_dataset(root, "cap", size=32, n_train=12, n_test_good=3, n_test_per_defect=1, seed=2)
    return root
