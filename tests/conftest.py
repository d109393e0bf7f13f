"""Fixtures: small seeded synthetic data folders in each layout, made fresh for each test session; a disk that
fills at a given size; a checkpoint's training scores computed again from its files."""
import contextlib
import csv
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reproduction import demo_data  # noqa: E402


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory) -> Path:
    """A data root with two tiny categories, 'lid' and 'cap' (32 px)."""
    root = tmp_path_factory.mktemp("mvtec")
    demo_data.make_dataset(root, "lid", size=32, n_train=16, n_test_good=4, n_test_per_defect=2, seed=1)
    demo_data.make_dataset(root, "cap", size=32, n_train=12, n_test_good=3, n_test_per_defect=1, seed=2)
    return root


def build_layout(root: Path, layout: str) -> Path:
    """A data root in `layout` (mvtec2, loco, visa, folder) with one category, 'lid': 10 clean training images,
    3 clean and 4 defective test images of the demo (32 px, seeded), each defect with its mask. LOCO's masks are
    split in two files, VisA's are class indices (0, 1, 2) and the folder's are named like their images."""
    src = demo_data.make_dataset(root / "src", "lid", size=32, n_train=10, n_test_good=3, n_test_per_defect=1, seed=3)
    cat = root / layout / "lid"
    good, test_good = sorted((src / "train" / "good").iterdir()), sorted((src / "test" / "good").iterdir())
    defects = [(kind, p, src / "ground_truth" / kind / f"{p.stem}_mask.png")
               for kind in demo_data.DEFECT_KINDS for p in sorted((src / "test" / kind).iterdir())]

    def put(image: Image.Image | Path, dst: Path, mode: str = "RGB"):
        dst.parent.mkdir(parents=True, exist_ok=True)
        (Image.open(image) if isinstance(image, Path) else image).convert(mode).save(dst)

    if layout in ("mvtec2", "loco"):
        test = cat / ("test_public" if layout == "mvtec2" else "test")
        for p in good:
            put(p, cat / "train" / "good" / p.name)
        for p in test_good:
            put(p, test / "good" / p.name)
            put(p, cat / "validation" / "good" / p.name)
        for kind, p, mask in defects:
            if layout == "mvtec2":
                put(p, test / "bad" / f"{kind}{p.name}")
                put(mask, test / "ground_truth" / "bad" / f"{kind}{p.stem}_mask.png", "L")
                continue
            kind_dir = "logical_anomalies" if kind in ("hole", "missing") else "structural_anomalies"
            put(p, test / kind_dir / f"{kind}{p.name}")
            arr = np.asarray(Image.open(mask))
            left, right = arr.copy(), arr.copy()
            left[:, 16:], right[:, :16] = 0, 0
            for half, name in ((left, "000.png"), (right, "001.png")):
                put(Image.fromarray(half), cat / "ground_truth" / kind_dir / f"{kind}{p.stem}" / name, "L")
    elif layout == "visa":
        rows = [("object", "split", "label", "image", "mask")]
        for split, images in (("train", good), ("test", test_good)):
            for p in images:
                rows.append(("lid", split, "normal", f"lid/Data/Images/Normal/{split}{p.stem}.JPG", ""))
                put(p, root / layout / rows[-1][3])
        for i, (kind, p, mask) in enumerate(defects):
            rows.append(("lid", "test", "anomaly", f"lid/Data/Images/Anomaly/{kind}{p.stem}.JPG",
                         f"lid/Data/Masks/Anomaly/{kind}{p.stem}.png"))
            put(p, root / layout / rows[-1][3])
            put(Image.fromarray((np.asarray(Image.open(mask)) > 127).astype(np.uint8) * (1 + i % 2)),
                root / layout / rows[-1][4], "L")
        (root / layout / "split_csv").mkdir()
        with open(root / layout / "split_csv" / "1cls.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    elif layout == "folder":
        for p in good + test_good:
            put(p, cat / "good" / f"{p.parent.parent.name}{p.name}")
        for kind, p, mask in defects:
            put(p, cat / kind / p.name)
            put(mask, cat / "masks" / kind / p.name, "L")
    return root / layout


@pytest.fixture(scope="session")
def lid_checkpoint(tmp_path_factory, mvtec_root) -> Path:
    """One tiny image-level 'normal' model of lid (32 px, 4 steps), trained once for the tests that score with it
    (test_predict.py, test_report.py)."""
    import run_training  # torch loads only for the tests that need a model
    out = tmp_path_factory.mktemp("lid_model")
    (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(out / "models"),
                                 "--log_dir", str(out / "logdirs"), "--epochs", "4", "--batch_size", "4", "--size",
                                 "32", "--no-pretrained", "--variant", "normal", "--workers", "0", "--log_every", "3"])
    return path


@pytest.fixture(scope="session")
def layout_roots(tmp_path_factory) -> dict[str, Path]:
    """The data root of each layout but MVTec AD's (`mvtec_root`), built once."""
    root = tmp_path_factory.mktemp("layouts")
    return {layout: build_layout(root, layout) for layout in ("mvtec2", "loco", "visa", "folder")}


@pytest.fixture
def disk_fills_at():
    """`with disk_fills_at(n):` no file this process writes may grow past n bytes, as on a disk that fills there: the
    kernel stops the write part way and fails the next one (EFBIG), whoever the writer is. Wrap only a call that
    writes nothing else (with capsys, pytest's captured output stays in memory)."""
    resource = pytest.importorskip("resource")  # POSIX only

    @contextlib.contextmanager
    def limit(size: int):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size if hard == resource.RLIM_INFINITY else min(size, hard), hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)
    return limit


def rescore_training_images(path: Path):
    """(the clean training scores a checkpoint stored, the same scores computed again on the CPU): its training
    images (--data_dir, --layout, --size of its config) embedded by the model loaded from the file, in the training's
    precision and memory format, and scored by the Gaussian loaded from the file."""
    import torch

    import dataset
    import density
    from storage import checkpoints
    from training.devices import embed_images
    ckpt = checkpoints.read_checkpoint(path)
    config, cpu = ckpt["config"], torch.device("cpu")
    model = checkpoints.model_from_checkpoint(ckpt, path)
    images = dataset.MVTecTrain(config["data_dir"], ckpt["category"], ckpt["size"], 0, config["layout"]).images
    embeds = embed_images(model, images, cpu, bool(config["amp"]), bool(config["channels_last"]))
    return ckpt["train_scores"], checkpoints.density_from_checkpoint(ckpt, path, cpu).score(density.normalize(embeds))


@pytest.fixture(scope="session")
def training_scores_again():
    """rescore_training_images, for the round-trip tests of checkpoints."""
    return rescore_training_images
