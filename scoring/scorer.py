"""The scoring graph: uint8 images in, anomaly scores (and a patch-level model's maps) out.

Everything that scores goes through `Scorer`: training's test monitor, eval.py (image-level, dense maps, ensembles),
GradCAM's density target, predict.py and the Detector, and export.py, whose file is this module's graph. An image is
one patch covering it: an image-level model scores it by the Mahalanobis distance of its embedding to the Gaussian of
the clean training embeddings (Li et al., CVPR 2021, section 3.3); a patch-level model (section 4.2) scores every patch
on a stride grid, each by one shared Gaussian or by its location cell's (appendix A.5), and spreads the scores over
their receptive fields into a map whose maximum is the image score.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import density as density_lib
from common.errors import CutPasteError
from common.paper import CELL_STRIDE, PATCH_BATCH, PATCH_SCORE_STRIDE
from localization import patches
from storage import checkpoints
from training.devices import embed_images


def cell_slots(cell_of: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Group P grid positions by their location cell (cell_of (P,), values < cells) into a (cells, K) table:
    (order (cells * K,) position of each slot, padded with position 0; slot (P,) each position's slot; K)."""
    counts = torch.bincount(cell_of, minlength=cells)
    width = int(counts.max())
    rank = torch.zeros_like(cell_of)
    for c in range(cells):  # the rank of each position within its cell, in grid order
        rows = cell_of == c
        rank[rows] = torch.arange(int(rows.sum()))
    slot = cell_of * width + rank
    order = torch.zeros(cells * width, dtype=torch.long)
    order[slot] = torch.arange(len(cell_of))
    return order, slot, width


class Scorer(nn.Module):
    """uint8 images (N, 3, S, S) -> (scores (N,), L2-normalised embeddings (N, D)) for an image-level model,
    (scores (N,), maps (N, S, S)) for a patch-level one. mean (C, D) and precision (C, D, D) hold C Gaussians of
    L2-normalised embeddings; cell_of (P,) names each grid position's Gaussian (all 0 when C is 1). `patch_batch` > 0
    embeds the patches in chunks of that many (eager runs, to bound memory); exports use 0 (one pass)."""

    def __init__(self, model, mean: torch.Tensor, precision: torch.Tensor, size: int, patch: int = 0,
                 stride: int = 0, cell_of: torch.Tensor | None = None, patch_batch: int = 0):
        super().__init__()
        self.model, self.size, self.maps, self.channels_last = model, size, patch > 0, False
        self.patch, self.stride, self.patch_batch = patch or size, stride if patch else 0, patch_batch
        starts = patches.patch_positions(size, self.patch, stride or size)
        self.register_buffer("rows", (starts.view(-1, 1) + torch.arange(self.patch)).flatten(), persistent=False)
        self.side = len(starts)
        mean, precision = mean.float().view(-1, mean.shape[-1]), precision.float().view(-1, *precision.shape[-2:])
        cell_of = torch.zeros(self.side ** 2, dtype=torch.long) if cell_of is None else cell_of.long()
        order, slot, self.width = cell_slots(cell_of, len(mean))
        for name, value in (("mean", mean), ("precision", precision), ("order", order), ("slot", slot)):
            self.register_buffer(name, value, persistent=False)
        self.upsample = patches.ReceptiveFieldUpsample(size, size, self.patch, stride) if self.maps else None

    def crops(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> float (N * P, 3, p, p) in [0, 1]: every patch of the grid, row by row."""
        x = images.float() / 255
        if self.patch == self.size:  # one patch: the image itself
            return x
        n, p, side = images.shape[0], self.patch, self.side
        x = x.index_select(2, self.rows).index_select(3, self.rows)
        return x.view(n, 3, side, p, side, p).permute(0, 2, 4, 1, 3, 5).reshape(n * side * side, 3, p, p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> (N, P, D) L2-normalised embeddings of every patch (P = 1 for an image model)."""
        x = self.crops(images)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        parts = x.split(self.patch_batch) if self.patch_batch > 0 else (x,)
        embeds = torch.cat([self.model.embed(part.contiguous(memory_format=fmt)).float() for part in parts])
        return F.normalize(embeds, p=2, dim=1).view(images.shape[0], self.side ** 2, -1)

    def distances(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, P, D) normalised embeddings -> (N, P) Mahalanobis distances, each to its position's Gaussian."""
        n, cells = embeds.shape[0], self.mean.shape[0]
        grouped = embeds.index_select(1, self.order).view(n, cells, self.width, -1).transpose(0, 1)
        dist = density_lib.mahalanobis(grouped.reshape(cells, n * self.width, -1), self.mean.unsqueeze(1),
                                       self.precision)
        return dist.view(cells, n, self.width).transpose(0, 1).reshape(n, -1).index_select(1, self.slot)

    def prepare(self, device: torch.device, channels_last: bool) -> "Scorer":
        """On `device`, with channels-last weights and inputs where asked."""
        self.channels_last = channels_last
        return self.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    @property
    def output_names(self) -> list[str]:
        return ["score", "map"] if self.maps else ["score", "embedding"]

    def forward(self, images: torch.Tensor):
        embeds = self.embed(images)
        dist = self.distances(embeds)
        if not self.maps:
            return dist[:, 0], embeds[:, 0]
        maps = self.upsample(dist.view(-1, self.side, self.side))
        return maps.amax(dim=(1, 2)), maps

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: Path, stride: int | None = None, patch_batch: int = 0) -> "Scorer":
        """A checkpoint's scoring graph (float32, CPU, eval mode); a patch-level model at `stride` (default: the
        stride its threshold was calibrated at)."""
        model = checkpoints.model_from_checkpoint(ckpt, path).eval()
        gaussian = checkpoints.density_from_checkpoint(ckpt, path, torch.device("cpu"), patch_ok=True)
        size, patch = int(ckpt["size"]), int(ckpt.get("patch_size", 0))
        stride = score_stride(ckpt, stride)
        return cls(model, gaussian.mean, gaussian.precision, size, patch, stride, patch_batch=patch_batch).eval()


def score_stride(ckpt: dict, stride: int | None = None) -> int:
    """The stride a patch-level checkpoint is scored at: `stride`, else the one its threshold was calibrated at;
    0 for an image-level checkpoint."""
    patch = int(ckpt.get("patch_size", 0))
    if not patch:
        return 0
    stride = stride or int(ckpt.get("score_stride", PATCH_SCORE_STRIDE))
    if stride > patch:
        raise CutPasteError(f"--stride {stride} is larger than the {patch} px patches; give {patch} or less")
    return stride


def fit_scorer(model, train_u8: torch.Tensor, settings, patch: int = 0, stride: int = 0, kind: str = "torch",
               local: bool = False, cell_stride: int = CELL_STRIDE, patch_batch: int = PATCH_BATCH):
    """A Scorer whose Gaussians are fitted on the clean images `train_u8` (N, 3, S, S), embedded under `settings`
    (inference.Settings: device, amp, channels_last), and the clean images' own scores (N,). Image-level: one
    Gaussian of the image embeddings (section 3.3); patch-level (`patch` > 0): Gaussians of clean patches, one per
    location cell when `local` (appendix A.5), scored at `stride`."""
    size = train_u8.shape[-1]
    if not patch:
        embeds = embed_images(model, train_u8, settings.device, settings.amp, settings.channels_last)
        gaussian, train_scores = density_lib.fit_and_score(embeds, embeds, kind)
        state = gaussian.state_dict()
        return Scorer(model, state["mean"], state["precision"], size).eval(), train_scores.float().cpu()
    embedder = patches.PatchEmbedder(model, settings.device, settings.amp, settings.channels_last, patch_batch)
    fitted = patches.embed_cells(embedder, train_u8, patch, cell_stride)
    gaussians, train_max = patches.fit_patch_density(fitted, len(train_u8), kind, local)
    state = gaussians.state_dict()
    cell_of = patches.nearest_cells(size, size, patch, stride, cell_stride) if local else None
    scorer = Scorer(model, state["mean"].cpu(), state["precision"].cpu(), size, patch, stride, cell_of, patch_batch)
    return scorer.eval(), train_max.float().cpu()
