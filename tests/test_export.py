"""export.py and scoring from its files: each format scores as PyTorch does (1e-4 relative), decides the same,
and predict.py writes the same CSV; bad checkpoints and exported files get one-line errors."""
import json

import onnx
import pandas as pd
import pytest
import torch

import dataset
import export as export_script
import predict
import run_training
from common.errors import CutPasteError
from deploy import export
from deploy.detector import Detector

FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
RTOL = 1e-4


def train(out, mvtec_root, *extra):
    (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(out / "models"),
                                 "--log_dir", str(out / "logdirs"), "--epochs", "4", "--batch_size", "4",
                                 "--no-pretrained", "--variant", "normal", "--workers", "0", "--log_every", "3",
                                 *extra])
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, mvtec_root) -> dict:
    """A tiny image-level model (32 px) and a tiny patch-level one (48 px images, 32 px patches), trained once."""
    out = tmp_path_factory.mktemp("export_models")
    return {"image": train(out / "image", mvtec_root, "--size", "32"),
            "patch": train(out / "patch", mvtec_root, "--size", "48", "--patch_size", "32")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, models) -> dict:
    out = tmp_path_factory.mktemp("exports")
    files = {}
    for kind, ckpt in models.items():
        for fmt, name in FILES.items():
            files[kind, fmt] = out / f"{kind}-{name}"
            if kind == "patch" and fmt == "openvino":  # the ONNX file converted, as export.py does; saves an export
                export.onnx_to_openvino(files[kind, "onnx"], export.open_export(files[kind, "onnx"])[1],
                                        files[kind, fmt])
            else:
                export_script.main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(files[kind, fmt])])
    return files


def test_each_format_scores_and_decides_as_pytorch(models, exported, mvtec_root):
    paths = [it.path for it in dataset.list_test_items(mvtec_root, "lid")]
    for kind, ckpt in models.items():
        ref = Detector.load(ckpt, device="cpu", amp=False, runtime="eager")  # eager float32 PyTorch
        want, want_maps = ref.score_and_maps(paths)
        order = want.sort().values
        # Every threshold between two clearly distinct scores, and the calibrated one.
        cuts = [ref.threshold()] + [float(a + b) / 2 for a, b in zip(order[:-1], order[1:]) if b - a > 1e-2 * b]
        for fmt in FILES:
            det = Detector.load(exported[kind, fmt])
            got, maps = det.score_and_maps(paths)
            assert torch.allclose(got, want, rtol=RTOL, atol=0), (kind, fmt, (got / want - 1).abs().max())
            assert det.threshold() == ref.threshold() and det.calibration_source == ref.calibration_source
            assert all(((got > c) == (want > c)).all() for c in cuts), (kind, fmt)
            if kind == "patch":
                assert maps.shape == (len(paths), 48, 48) and torch.allclose(maps, want_maps, rtol=RTOL, atol=0)
                assert torch.allclose(got, maps.amax(dim=(1, 2))), "the image score is the map's maximum"
            else:
                assert maps is None and det.heatmaps(paths[:1]) is None
            assert det.score(paths[:1]).shape == (1,), "dynamic batch size"
            assert det.metadata["category"] == "lid" and det.metadata["size"] == ref.size


def test_predict_on_an_export_writes_the_checkpoints_csv(tmp_path, models, exported, mvtec_root):
    images = str(mvtec_root / "lid" / "test")
    for kind in models:
        frames = {}
        for name, source in (("ckpt", models[kind]), ("onnx", exported[kind, "onnx"])):
            out = tmp_path / f"{kind}-{name}.csv"
            predict.main([images, "--checkpoint", str(source), "--out", str(out), "--device", "cpu", "--no-amp",
                          "--overlay_dir", str(tmp_path / f"overlays-{kind}-{name}")])
            frames[name] = pd.read_csv(out, keep_default_na=False)
        a, b = frames["ckpt"], frames["onnx"]
        assert (a[["path", "label", "error"]] == b[["path", "label", "error"]]).all().all()
        assert torch.allclose(torch.tensor(b["score"].values), torch.tensor(a["score"].values), rtol=RTOL, atol=0)
        assert (a["threshold"] == b["threshold"]).all()
        overlays = sorted((tmp_path / f"overlays-{kind}-onnx").rglob("*.overlay.png"))
        assert len(overlays) == len(a)


def test_unsupported_backbone_and_bad_out_get_clear_errors(tmp_path, models):
    ckpt = torch.load(models["image"], weights_only=True)
    ckpt["model"]["arch"] = "vit_b_16"
    other = tmp_path / "vit.tch"
    torch.save(ckpt, other)
    with pytest.raises(CutPasteError, match="vit.tch: backbone vit_b_16 is not among the exportable"):
        export_script.main(["--checkpoint", str(other), "--out", str(tmp_path / "vit.onnx")])
    with pytest.raises(CutPasteError, match=r"openvino export is named \*\.xml"):
        export_script.main(["--checkpoint", str(models["image"]), "--format", "openvino", "--out",
                            str(tmp_path / "m.onnx")])


def rewrite_meta(src, dst, **changes):
    graph = onnx.load(str(src))
    meta = json.loads(next(p.value for p in graph.metadata_props if p.key == export.META_KEY))
    onnx.helper.set_model_props(graph, {export.META_KEY: json.dumps({**meta, **changes})})
    onnx.save(graph, str(dst))


def test_bad_exported_files_get_one_line_errors(tmp_path, exported, mvtec_root):
    onnx_file = exported["image", "onnx"]
    cases = {"newer.onnx": (dict(export_format=export.EXPORT_FORMAT + 1), "export format"),
             "resized.onnx": (dict(size=64), "declares 64 px images but its graph takes 32")}
    for name, (changes, message) in cases.items():
        rewrite_meta(onnx_file, tmp_path / name, **changes)
        with pytest.raises(CutPasteError, match=f"{name}.*{message}.*export.py"):
            Detector.load(tmp_path / name)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[:100_000])
    with pytest.raises(CutPasteError, match="truncated.onnx.*truncated.*export.py"):
        predict.main([str(mvtec_root / "lid" / "test" / "good"), "--checkpoint", str(truncated)])
    rewrite_meta(onnx_file, tmp_path / "escape.onnx", category="../lid")
    with pytest.raises(CutPasteError, match=r"escape.onnx holds the category '../lid', which is not a plain name"):
        Detector.load(tmp_path / "escape.onnx")
    bare = tmp_path / "bare.onnx"
    graph = onnx.load(str(onnx_file))
    del graph.metadata_props[:]
    onnx.save(graph, str(bare))
    with pytest.raises(CutPasteError, match="bare.onnx holds no CutPaste metadata"):
        Detector.load(bare)
    xml = exported["image", "openvino"]
    (tmp_path / "cut.xml").write_bytes(xml.read_bytes())
    (tmp_path / "cut.bin").write_bytes(xml.with_suffix(".bin").read_bytes()[:1000])
    with pytest.raises(CutPasteError, match="cut.xml.*truncated"):
        Detector.load(tmp_path / "cut.xml")
    pt = tmp_path / "cut.pt"
    pt.write_bytes(exported["image", "torchscript"].read_bytes()[:100_000])
    with pytest.raises(CutPasteError, match="cut.pt.*truncated"):
        Detector.load(pt)
