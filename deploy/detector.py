"""The public Python API: a trained model, ready to score images and decide.

A Detector is a Scorer (the scoring graph, scoring/scorer.py) run under inference settings, the image size it takes,
and the calibration of its threshold: an image is anomalous above a threshold, by default the quantile of the clean
training images' held-out scores (about 1 - quantile of new clean images get flagged; Li et al., CVPR 2021,
section 3.3). It reads checkpoints and the files of export.py alike::

    det = Detector.load("models/model-bottle-<date>.tch"); results = det.predict(paths, det.threshold())
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import dataset
import density as density_lib
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE, PREDICT_BATCH
from deploy import export as export_lib
from scoring import inference
from scoring.scorer import Scorer
from storage import checkpoints
from training.devices import resolve_device

ANOMALOUS, NORMAL, UNREADABLE = "anomalous", "normal", "error"


@dataclass(frozen=True)
class Prediction:
    path: str
    score: float  # NaN when the image could not be read
    label: str  # "anomalous", "normal", or "error" for an unreadable image
    error: str = ""


def _tensor_to_u8(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) or (3, H, W), uint8 or float in [0, 1] -> uint8 (N, 3, size, size) (antialiased resize)."""
    images = images.unsqueeze(0) if images.dim() == 3 else images
    if images.dim() != 4 or images.shape[1] != 3:
        raise CutPasteError(f"images must be (N, 3, H, W) or (3, H, W); got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if images.shape[-2:] != (size, size):
        images = TF.resize(images, [size, size], antialias=True)
    return images


@dataclass
class Detector:
    """run: uint8 (N, 3, size, size) -> (scores (N,), maps (N, size, size) or None), float32 on the CPU;
    calibration_scores: the clean training images' held-out scores (map maxima for a patch-level model), and
    calibration_source says what they are; localizes: whether run returns maps; runtime: what runs the graph."""
    run: object
    size: int
    calibration_scores: torch.Tensor
    calibration_source: str
    category: str = ""
    source: str = ""
    localizes: bool = False
    runtime: str = ""
    metadata: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path, device: str = "auto", amp: bool | None = None, channels_last: bool | None = None,
             runtime: str = "auto") -> "Detector":
        """Read a checkpoint onto `device` under inference.choose's settings (the arguments override them), or an
        exported file (export.py; on the CPU, float32). A patch-level model scores by its dense map's maximum."""
        path = Path(path)
        if export_lib.is_export(path):
            return cls.from_export(path)
        ckpt = checkpoints.read_checkpoint(path)
        settings = inference.choose(resolve_device(device), runtime, amp, channels_last,
                                    ckpt["model"].get("arch", "resnet18"), bool(ckpt["config"].get("amp", False)))
        scorer = Scorer.from_checkpoint(ckpt, path)
        scores, source = checkpoints.calibration(ckpt, scorer.stride)
        return cls(inference.runner(scorer, settings), scorer.size, torch.tensor(scores), source, ckpt["category"],
                   str(path), scorer.maps, settings.describe())

    @classmethod
    def from_export(cls, path) -> "Detector":
        """An exported file (ONNX Runtime, OpenVINO or TorchScript, on the CPU)."""
        session, meta = export_lib.open_export(Path(path))
        patch = int(meta["patch_size"])
        run = inference.SessionRunner(session, patch > 0, 1 if patch else inference.IMAGE_BATCH)
        return cls(run, int(meta["size"]), torch.tensor(meta["calibration_scores"]), meta["calibration_source"],
                   meta["category"], str(path), bool(patch), f"{Path(path).name} (exported, CPU float32)", meta)

    def threshold(self, quantile: float = DEFAULT_QUANTILE) -> float:
        """The `quantile` of the clean training images' (held-out) scores: about 1 - quantile false alarms."""
        if self.calibration_scores.numel() == 0:
            raise CutPasteError(f"{self.source} holds no clean scores to calibrate a threshold on "
                                f"({self.calibration_source}); pass --threshold, or retrain it with this code")
        return density_lib.quantile_threshold(self.calibration_scores, quantile)

    def to_uint8(self, images) -> torch.Tensor:
        """Paths, PIL images or a tensor batch -> uint8 (N, 3, size, size), decoded as training decodes."""
        if torch.is_tensor(images):
            return _tensor_to_u8(images, self.size)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        out = [TF.pil_to_tensor(im.convert("RGB").resize((self.size, self.size), Image.BILINEAR))
               if isinstance(im, Image.Image) else dataset.load_image(Path(im), self.size) for im in images]
        return torch.stack(out) if out else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)

    def score_and_maps(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Anomaly scores (N,) float32 on the CPU and, for a patch-level model, its maps (N, size, size)."""
        batch = self.to_uint8(images)
        if batch.shape[0] == 0:
            return torch.empty(0), (torch.empty(0, self.size, self.size) if self.localizes else None)
        return self.run(batch)

    def score(self, images) -> torch.Tensor:
        """Anomaly scores (N,) float32 on the CPU for paths, PIL images or a (N, 3, H, W) tensor."""
        return self.score_and_maps(images)[0]

    def heatmaps(self, images) -> torch.Tensor | None:
        """(N, size, size) anomaly maps of a patch-level model; None for an image-level one."""
        return self.score_and_maps(images)[1]

    def predict(self, paths, threshold: float, batch_size: int = PREDICT_BATCH, workers: int = 0,
                on_batch=None) -> list[Prediction]:
        """Score image files against `threshold`; an undecodable file gets label 'error'. on_batch(paths, uint8
        images, scores, maps or None), when given, sees each scored chunk (for overlays)."""
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = [str(p) for p in paths[start:start + batch_size]]
            decoded = decode_each(chunk, self.size, workers)
            good = [(p, img) for p, img in zip(chunk, decoded) if torch.is_tensor(img)]
            batch = torch.stack([img for _, img in good]) if good else None
            scores, maps = self.score_and_maps(batch) if good else (torch.empty(0), None)
            by_path = {p: float(s) for (p, _), s in zip(good, scores.tolist())}
            results += [Prediction(p, by_path[p], ANOMALOUS if by_path[p] > threshold else NORMAL)
                        if torch.is_tensor(img) else Prediction(p, float("nan"), UNREADABLE, img)
                        for p, img in zip(chunk, decoded)]
            if on_batch is not None and good:
                on_batch([p for p, _ in good], batch, scores, maps)
        return results


def decode_each(paths: list[str], size: int, workers: int) -> list:
    """Each path's uint8 (3, size, size) image, or the error message when it cannot be decoded."""
    def one(path):
        try:
            return dataset.load_image(Path(path), size)
        except CutPasteError as err:
            return str(err)
    if workers > 0:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, paths))
    return [one(p) for p in paths]
