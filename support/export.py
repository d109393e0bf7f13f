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
import torch.nn.functional as F
from torch import nn

from config.paper import DEFAULT_QUANTILE, PATCH_SCORE_STRIDE
from density import quantile_threshold
from support import checkpoints, patches
from support.errors import CutPasteError
from support.options import EXPORT_FORMATS as FORMATS

# Bumped when the graph's inputs, outputs or metadata change in a way older readers cannot follow.
EXPORT_FORMAT = 1
META_KEY = "cutpaste"  # ONNX metadata_props key, OpenVINO rt_info key; TorchScript: extra file cutpaste.json
TORCHSCRIPT_META = "cutpaste.json"
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
# Backbone families whose graphs export and score within 1e-4 of PyTorch (tests/test_export.py covers resnet18).
EXPORTABLE_ARCHS = ("resnet", "wide_resnet", "resnext", "efficientnet_b")
ONNX_OPSET = 18


class ImageScorer(nn.Module):
    """uint8 (N, 3, S, S) -> anomaly scores (N,) of an image-level model."""

    def __init__(self, model, mean: torch.Tensor, precision: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("mean", mean.float())
        self.register_buffer("precision", precision.float())

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, s, s) float images -> (N,) distances of their L2-normalised embeddings to the Gaussian (density.py),
        in ops that every exporter takes."""
        diff = F.normalize(self.model.embed(x), p=2, dim=1) - self.mean
        return ((diff @ self.precision) * diff).sum(dim=1).clamp(min=0).sqrt()

    def forward(self, images):
        return self.distances(images.float() / 255)


class PatchScorer(ImageScorer):
    """uint8 (N, 3, S, S) -> (scores (N,), maps (N, S, S)) of a patch-level model: every patch of the `stride` grid
    in one batch, scored by the shared Gaussian, upsampled over its receptive field; score = the map's maximum."""

    def __init__(self, model, mean: torch.Tensor, precision: torch.Tensor, size: int, patch: int, stride: int):
        super().__init__(model, mean, precision)
        self.patch = patch
        starts = patches.patch_positions(size, patch, stride)
        self.register_buffer("rows", (starts.view(-1, 1) + torch.arange(patch)).flatten())
        # upsample_scores' weighted mean, wy @ g @ wx.T / (wy @ 1 @ wx.T), with each weight row normalised.
        weights = patches.receptive_field_weights(size, starts, patch)
        self.register_buffer("weights", (weights / weights.sum(dim=1, keepdim=True)).float())

    def forward(self, images):
        n, cells, p = images.shape[0], self.weights.shape[1], self.patch
        x = (images.float() / 255).index_select(2, self.rows).index_select(3, self.rows)
        x = x.view(n, 3, cells, p, cells, p).permute(0, 2, 4, 1, 3, 5).reshape(n * cells * cells, 3, p, p)
        maps = self.weights @ self.distances(x).view(n, cells, cells) @ self.weights.T
        return maps.amax(dim=(1, 2)), maps


def scorer_from_checkpoint(ckpt: dict, path: Path, stride: int | None = None) -> tuple[nn.Module, dict]:
    """The scoring graph of a checkpoint (float32, eval mode) and its metadata."""
    model = checkpoints.model_from_checkpoint(ckpt, path).eval()
    size, patch = int(ckpt["size"]), int(ckpt.get("patch_size", 0))
    density = checkpoints.density_from_checkpoint(ckpt, path, torch.device("cpu"), patch_ok=True)
    stride = stride or int(ckpt.get("score_stride", PATCH_SCORE_STRIDE))
    if patch:
        if stride > patch:
            raise CutPasteError(f"--stride {stride} is larger than the {patch} px patches; give {patch} or less")
        net = PatchScorer(model, density.mean, density.precision, size, patch, stride)
    else:
        net = ImageScorer(model, density.mean, density.precision)
    scores, source = calibration(ckpt, stride)
    meta = {"export_format": EXPORT_FORMAT, "code_version": checkpoints.code_version(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": path.name,
            "category": ckpt["category"], "variant": ckpt["variant"], "size": size, "patch_size": patch,
            "stride": stride if patch else 0, "arch": ckpt["model"].get("arch", "resnet18"),
            "calibration_scores": scores, "calibration_source": source,
            "threshold": quantile_threshold(torch.tensor(scores), DEFAULT_QUANTILE) if scores else None,
            "threshold_quantile": DEFAULT_QUANTILE}
    return net.eval(), meta


def calibration(ckpt: dict, stride: int) -> tuple[list[float], str]:
    """The clean training images' held-out scores (or their fallback) and what they are."""
    held = ckpt.get("heldout_scores")
    patch = ckpt.get("patch_size", 0)
    if held is not None and held.numel() > 0:
        if patch and int(ckpt.get("score_stride", 0)) != stride:
            return [], (f"none: the held-out map maxima were scored at stride {ckpt.get('score_stride')}, this "
                        f"export scores at {stride}")
        return held.float().tolist(), "held-out clean training " + ("map maxima" if patch else "scores")
    if patch:
        return [], "none: a patch-level checkpoint from older code, without held-out map maxima"
    return ckpt["train_scores"].float().tolist(), "in-sample clean training scores (older checkpoint)"


def example_batch(size: int, n: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def write_onnx(net: nn.Module, meta: dict, out: Path) -> None:
    """torch.onnx (the torch.export-based exporter), batch dimension dynamic, metadata in metadata_props."""
    import onnx
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(net, (example_batch(meta["size"]),), str(raw), dynamo=True, external_data=False,
                          input_names=["images"], output_names=["score", "map"] if meta["patch_size"] else ["score"],
                          dynamic_shapes={"images": {0: batch}}, opset_version=ONNX_OPSET, verbose=False)
        graph = onnx.load(str(raw))
    onnx.helper.set_model_props(graph, {META_KEY: json.dumps(meta)})
    checkpoints.atomic_write(out, lambda fh: fh.write(graph.SerializeToString()))


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
        traced = torch.jit.freeze(torch.jit.trace(net, example_batch(meta["size"]), check_trace=False))
        checkpoints.atomic_write(out, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))


WRITERS = {"onnx": write_onnx, "openvino": write_openvino, "torchscript": write_torchscript}


def export(checkpoint: Path, fmt: str, out: Path, stride: int | None = None) -> dict:
    """Write `checkpoint`'s scoring graph as `fmt` to `out`; returns the metadata written."""
    checkpoint, out = Path(checkpoint), Path(out)
    ckpt = checkpoints.read_checkpoint(checkpoint)
    arch = ckpt["model"].get("arch", "resnet18")
    if not arch.startswith(EXPORTABLE_ARCHS):
        raise CutPasteError(f"{checkpoint}: backbone {arch} is not among the exportable ones "
                            f"({', '.join(EXPORTABLE_ARCHS)} families); score it with predict.py --checkpoint "
                            f"{checkpoint.name} instead")
    if fmt not in FORMATS:
        raise CutPasteError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    want = SUFFIXES.get(fmt)
    if (want and out.suffix != want) or (not want and out.suffix in SUFFIXES.values()):
        raise CutPasteError(f"--out {out}: a {fmt} export is named "
                            + (f"*{want}" if want else "*.pt (not .onnx or .xml)"))
    net, meta = scorer_from_checkpoint(ckpt, checkpoint, stride)
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
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    images = session.get_inputs()[0]
    return lambda x: session.run(None, {images.name: x}), meta, images.shape[-1]  # None: every output, in order


def _open_openvino(path: Path):
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    meta = model.get_rt_info([META_KEY]).astype(str) if model.has_rt_info([META_KEY]) else None
    size = model.input(0).get_partial_shape()[-1].get_length()
    # float32 as exported: the CPU plugin would otherwise run bf16 where the CPU has it.
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: list(compiled(x).to_tuple()), meta, size


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
    checkpoints.plain_name(meta.get("category"), "the category", path)
    if version != EXPORT_FORMAT:
        raise CutPasteError(f"{path} is export format {version} (code {meta.get('code_version')}), this code "
                            f"({checkpoints.code_version()}) reads {EXPORT_FORMAT}; {fix}")
    if graph_size not in (None, size):
        raise CutPasteError(f"{path} declares {size} px images but its graph takes {graph_size} px ones (files of "
                            f"two exports mixed?); {fix}")
    return run, meta
