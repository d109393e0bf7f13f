"""Deployable detectors (export.py): one file per model, uint8 images (N, 3, S, S) in, anomaly scores (N,) out, with
the ImageNet normalisation, the backbone and the Gaussian score (Li et al., CVPR 2021, section 3.3) in the graph;
a patch-level model also returns its anomaly map (section 4.2). ONNX, OpenVINO IR or TorchScript; the category,
size, calibration scores and code version travel in the file's metadata. Runtimes load on first use."""
import datetime
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from cli.options import EXPORT_FORMATS as FORMATS
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE
from density import quantile_threshold
from scoring import inference
from scoring.scorer import Scorer
from storage import checkpoints, files

# Bumped when the graph's inputs, outputs or metadata change in a way older readers cannot follow.
EXPORT_FORMAT = 1
META_KEY = "cutpaste"  # ONNX metadata_props key, OpenVINO rt_info key; TorchScript: extra file cutpaste.json
TORCHSCRIPT_META = "cutpaste.json"
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}


def metadata(ckpt: dict, path: Path, scorer: Scorer) -> dict:
    """What an exported file says of itself: category, size, variant, calibration, threshold, code version."""
    scores, source = checkpoints.calibration(ckpt, scorer.stride)
    return {"export_format": EXPORT_FORMAT, "code_version": checkpoints.code_version(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": path.name,
            "category": ckpt["category"], "variant": ckpt["variant"], "size": scorer.size,
            "patch_size": int(ckpt.get("patch_size", 0)), "stride": scorer.stride,
            "arch": ckpt["model"].get("arch", "resnet18"), "calibration_scores": scores, "calibration_source": source,
            "threshold": quantile_threshold(torch.tensor(scores), DEFAULT_QUANTILE) if scores else None,
            "threshold_quantile": DEFAULT_QUANTILE}


def write_onnx(net: nn.Module, meta: dict, out: Path) -> None:
    """The Scorer's ONNX graph (inference.onnx_graph), metadata in metadata_props."""
    import onnx
    graph = inference.onnx_graph(net)
    onnx.helper.set_model_props(graph, {META_KEY: json.dumps(meta)})
    files.atomic_write(out, lambda fh: fh.write(graph.SerializeToString()))


def write_openvino(net: nn.Module, meta: dict, out: Path) -> None:
    """OpenVINO IR (.xml and its .bin) through its ONNX reader, float32 weights, metadata in rt_info."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        write_onnx(net, meta, Path(tmp) / "model.onnx")
        onnx_to_openvino(Path(tmp) / "model.onnx", meta, out)


def onnx_to_openvino(onnx_file: Path, meta: dict, out: Path) -> None:
    import openvino as ov
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        model = ov.convert_model(str(onnx_file))
        model.set_rt_info(json.dumps(meta), [META_KEY])
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(tmp) / "model.bin", out.with_suffix(".bin"))  # the .xml names its .bin by file name
        os.replace(Path(tmp) / "model.xml", out)


def write_torchscript(net: nn.Module, meta: dict, out: Path) -> None:
    """torch.jit.trace (batch size follows the input), frozen; metadata as the extra file cutpaste.json."""
    extra = {TORCHSCRIPT_META: json.dumps(meta)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notes: TorchScript is asked for
        traced = torch.jit.freeze(torch.jit.trace(net, inference.example_batch(meta["size"]), check_trace=False))
        files.atomic_write(out, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))


WRITERS = {"onnx": write_onnx, "openvino": write_openvino, "torchscript": write_torchscript}


def export(checkpoint: Path, fmt: str, out: Path, stride: int | None = None) -> dict:
    """Write `checkpoint`'s scoring graph as `fmt` to `out`; returns the metadata written."""
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = checkpoints.read_checkpoint(checkpoint)
    arch = ckpt["model"].get("arch", "resnet18")
    if not inference.exportable(arch):
        raise CutPasteError(f"{checkpoint}: backbone {arch} is not among the exportable ones "
                            f"({', '.join(inference.EXPORTABLE_ARCHS)} families); score it with predict.py "
                            f"--checkpoint {checkpoint.name} instead")
    if fmt not in FORMATS:
        raise CutPasteError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    want = SUFFIXES.get(fmt)
    if (want and out.suffix != want) or (not want and out.suffix in SUFFIXES.values()):
        raise CutPasteError(f"--out {out}: a {fmt} export is named "
                            + (f"*{want}" if want else "*.pt (not .onnx or .xml)"))
    net = Scorer.from_checkpoint(ckpt, checkpoint, stride)
    meta = metadata(ckpt, checkpoint, net)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        WRITERS[fmt](net, meta, out)
    except CutPasteError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CutPasteError(f"{checkpoint}: exporting its {meta['arch']} graph to {fmt} failed ({type(err).__name__}: "
                            f"{first}); score it with predict.py --checkpoint {checkpoint.name} instead") from None
    return meta


def is_export(path: Path) -> bool:
    """An ONNX or OpenVINO file by its name, or a TorchScript archive holding our metadata."""
    path = Path(path)
    if path.suffix in SUFFIXES.values():
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"extra/{TORCHSCRIPT_META}") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _open_onnx(path: Path):
    run, session = inference.onnxruntime_session(path)
    return run, session.get_modelmeta().custom_metadata_map.get(META_KEY), session.get_inputs()[0].shape[-1]


def _open_openvino(path: Path):
    run, model = inference.openvino_session(path)
    meta = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
    return run, meta, model.input(0).get_partial_shape()[-1].get_length()


def _open_torchscript(path: Path):
    extra = {TORCHSCRIPT_META: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)

    def run(x):
        with torch.inference_mode():
            out = net(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    return run, extra[TORCHSCRIPT_META] or None, None


def open_export(path: Path):
    """(run: uint8 (N, 3, S, S) numpy -> [scores (N,), maps (N, S, S) for a patch model], metadata) of an exported
    file; errors name the file and the fix."""
    path = Path(path)
    opener = {".onnx": _open_onnx, ".xml": _open_openvino}.get(path.suffix, _open_torchscript)
    fix = f"export it again: python export.py --checkpoint <its .tch> --out {path.name}"
    if not path.is_file():
        raise CutPasteError(f"exported model {path} does not exist; {fix}")
    try:
        run, text, graph_size = opener(path)
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise CutPasteError(f"cannot read exported model {path} ({type(err).__name__}: {first}); it may be "
                            f"truncated: {fix}") from None
    try:
        meta = json.loads(text)
        version, size = meta["export_format"], int(meta["size"])
    except (TypeError, ValueError, KeyError):
        raise CutPasteError(f"{path} holds no CutPaste metadata: it is not a file export.py wrote; {fix}") from None
    files.plain_name(meta.get("category"), "the category", path)
    if version != EXPORT_FORMAT:
        raise CutPasteError(f"{path} is export format {version} (code {meta.get('code_version')}), this code "
                            f"({checkpoints.code_version()}) reads {EXPORT_FORMAT}; {fix}")
    if graph_size not in (None, size):
        raise CutPasteError(f"{path} declares {size} px images but its graph takes {graph_size} px ones (files of "
                            f"two exports mixed?); {fix}")
    return run, meta
