"""How a Scorer runs for inference: on which device and runtime, in which precision and memory format.

Inference chooses apart from training. A model trained in bf16 is scored in bf16 where the device runs it natively,
so that its scores match the Gaussian and the threshold fitted on bf16 embeddings. Otherwise, on a CPU, the Scorer's
ONNX graph runs under ONNX Runtime in float32 where the backbone exports and the work repays the export of the graph
(a few seconds): dense maps, and the Detector, which scores streams of new images; eval.py's one pass over a test
set runs eager. Eager runs channels-last. The flags (--runtime, --amp, --channels_last) override each choice; the
start-up line names what runs. doc/performance.md has the measurements behind these choices.
"""
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli.options import RUNTIMES
from common.errors import CutPasteError
from common.paper import PATCH_BATCH
from training.devices import autocast, bf16_supported, describe

# Backbone families whose graphs export and score within 1e-4 of PyTorch (tests/test_export.py covers resnet18).
EXPORTABLE_ARCHS = ("resnet", "wide_resnet", "resnext", "efficientnet_b")
ONNX_OPSET = 18
# Images per call when scoring whole images.
IMAGE_BATCH = 32


def exportable(arch: str) -> bool:
    return arch.startswith(EXPORTABLE_ARCHS)


@dataclass(frozen=True)
class Settings:
    """Where and how a Scorer runs: device, runtime (eager, onnxruntime, openvino), bf16 autocast, memory format."""
    device: torch.device
    runtime: str = "eager"
    amp: bool = False
    channels_last: bool = False

    def describe(self) -> str:
        if self.runtime == "eager":
            return f"PyTorch eager on {describe(self.device, self.amp, self.channels_last)}"
        return f"{self.runtime} on cpu ({torch.get_num_threads()} threads), float32"


def choose(device: torch.device, runtime: str = "auto", amp: bool | None = None, channels_last: bool | None = None,
           arch: str = "resnet18", trained_amp: bool = False, export_pays: bool = True) -> Settings:
    """Inference's settings for `device` and a model of `arch` trained with bf16 autocast or not, for work that
    repays an export or not; None and 'auto' choose (module docstring), given values win. An exported runtime with
    --amp, or on another device than the CPU, is refused with the fix."""
    if runtime not in RUNTIMES:
        raise CutPasteError(f"unknown --runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if amp is None and runtime in ("auto", "eager"):
        amp = trained_amp and bf16_supported(device)
    if runtime == "auto":
        eager = not export_pays or device.type != "cpu" or amp or channels_last is not None or not exportable(arch)
        runtime = "eager" if eager else "onnxruntime"
    if runtime != "eager":
        if device.type != "cpu" or amp:
            raise CutPasteError(f"--runtime {runtime} runs float32 on the CPU; use --device cpu --no-amp, or "
                                f"--runtime eager")
        if not exportable(arch):
            raise CutPasteError(f"--runtime {runtime}: backbone {arch} does not export; use --runtime eager")
        return Settings(device, runtime)
    return Settings(device, "eager", bool(amp), True if channels_last is None else channels_last)


def example_batch(size: int, n: int = 2) -> torch.Tensor:
    """Seeded uint8 images (n, 3, size, size): the example input of exports and benchmarks."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def onnx_graph(scorer):
    """The Scorer as an ONNX ModelProto (torch.export-based exporter), batch dimension dynamic."""
    batch = {"images": {0: torch.export.Dim("batch", min=1)}}
    program = torch.onnx.export(scorer, (example_batch(scorer.size),), dynamo=True, input_names=["images"],
                                output_names=scorer.output_names, dynamic_shapes=batch, opset_version=ONNX_OPSET,
                                verbose=False)
    return program.model_proto


def onnxruntime_session(model):
    """(run: uint8 (N, 3, S, S) numpy -> list of output arrays, the onnxruntime.InferenceSession, which holds the
    graph's metadata) for an ONNX file path or serialised bytes."""
    import onnxruntime as ort
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})), session  # None: every output, in order


def openvino_session(model):
    """The same for an OpenVINO IR (.xml path) or ONNX bytes, compiled for the CPU in float32: (run, the model
    read, which holds the metadata)."""
    import openvino as ov
    core = ov.Core()
    if isinstance(model, bytes):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.onnx").write_bytes(model)
            net = core.read_model(str(Path(tmp) / "model.onnx"))
    else:
        net = core.read_model(str(model))
    # float32 as exported: the CPU plugin would otherwise run bf16 where the CPU has it.
    compiled = core.compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return (lambda x: list(compiled(x).to_tuple())), net


class SessionRunner:
    """Scores uint8 images (N, 3, S, S) in batches of `batch` with session(uint8 numpy) -> [scores, maps]:
    (scores (N,), maps (N, S, S) or None), float32 on the CPU."""

    def __init__(self, session, maps: bool, batch: int, progress: bool = False):
        self.session, self.maps, self.batch, self.progress = session, maps, batch, progress

    def _call(self, batch: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(np.asarray(out)) for out in self.session(batch.numpy())]

    def outputs(self, images_u8: torch.Tensor) -> list[torch.Tensor]:
        """Every output of the graph for the images, batch by batch, joined: [scores, maps or embeddings]."""
        outs = [self._call(part) for part in tqdm(images_u8.split(self.batch), desc="score", leave=False,
                                                   dynamic_ncols=True, disable=not self.progress)]
        return [torch.cat(parts).float() for parts in zip(*outs)]

    def __call__(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scores (N,), maps (N, S, S) or None) of N >= 1 images."""
        joined = self.outputs(images_u8)
        return joined[0], joined[1] if self.maps else None


class EagerRunner(SessionRunner):
    """The same with the Scorer itself in PyTorch, on the settings' device, memory format and autocast."""

    def __init__(self, scorer, settings: Settings, batch: int, progress: bool = False):
        super().__init__(None, scorer.maps, batch, progress)
        self.scorer, self.settings = scorer.prepare(settings.device, settings.channels_last).eval(), settings

    def _call(self, batch: torch.Tensor) -> list[torch.Tensor]:
        with torch.inference_mode(), autocast(self.settings.device, self.settings.amp):
            return [out.float().cpu() for out in self.scorer(batch.to(self.settings.device, non_blocking=True))]


def runner(scorer, settings: Settings, batch: int = 0, progress: bool = False) -> SessionRunner:
    """A Scorer run under `settings`: eager, or its ONNX graph in ONNX Runtime or OpenVINO. `batch`: images per
    call (default: IMAGE_BATCH whole images, or as many images as fill PATCH_BATCH patches)."""
    batch = batch or (max(1, PATCH_BATCH // scorer.side ** 2) if scorer.maps else IMAGE_BATCH)
    if settings.runtime == "eager":
        return EagerRunner(scorer, settings, batch, progress)
    scorer.patch_batch = 0  # one pass per call, which a dynamic batch needs; `batch` bounds the memory
    proto = onnx_graph(scorer.prepare(torch.device("cpu"), False).eval())
    opener = onnxruntime_session if settings.runtime == "onnxruntime" else openvino_session
    return SessionRunner(opener(proto.SerializeToString())[0], scorer.maps, batch, progress)
