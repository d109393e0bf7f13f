"""Patch-level CutPaste (Li et al., CVPR 2021, sections 2.4 and 4.2): training batches of random crops, and dense
anomaly maps from every patch's Gaussian score, upsampled over its receptive field.
Images are uint8 (N, 3, H, W); maps float32 (N, H, W) on the CPU, larger = more anomalous."""
from dataclasses import dataclass

import torch
from tqdm import tqdm

import density as density_lib
from common.errors import CutPasteError
from common.paper import CELL_STRIDE, PATCH_BATCH
from cutpaste import augment_batch, sample_indices
from training.devices import autocast, memory_format

# Width of the Gaussian that spreads each patch score over its receptive field (the patch), as the
# receptive-field upsampling of Liznerski et al. (FCDD, ICLR 2021) that section 4.2 cites.
SMOOTHING_SIGMA = 4.0


def sample_crops(n: int, img_h: int, img_w: int, patch: int, gen: torch.Generator):
    """Top-left corners (top, left), each (n,) long, of patch x patch crops uniform over the image."""
    top = torch.randint(img_h - patch + 1, (n,), generator=gen, device=gen.device)
    left = torch.randint(img_w - patch + 1, (n,), generator=gen, device=gen.device)
    return top, left


def apply_crops(images: torch.Tensor, idx: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                patch: int) -> torch.Tensor:
    """Crops (B, C, patch, patch) of images[idx[b]] at (top[b], left[b]), gathered in one indexing op."""
    offsets = torch.arange(patch, device=images.device)
    rows = (top.to(images.device).view(-1, 1) + offsets).view(-1, 1, patch, 1)
    cols = (left.to(images.device).view(-1, 1) + offsets).view(-1, 1, 1, patch)
    chans = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return images[idx.to(images.device).view(-1, 1, 1, 1), chans, rows, cols]


def make_patch_batch(images_u8: torch.Tensor, variant: str, batch_size: int, patch: int, gen: torch.Generator):
    """Random crops c(x), then CutPaste inside each (section 2.4, equation 3); x and labels as cutpaste.make_batch."""
    n, _, h, w = images_u8.shape
    idx = sample_indices(n, batch_size, gen)
    top, left = sample_crops(batch_size, h, w, patch, gen)
    return augment_batch(apply_crops(images_u8, idx, top, left, patch).float().div_(255), variant, gen)


def patch_positions(size: int, patch: int, stride: int) -> torch.Tensor:
    """Patch starts along one side: every `stride` pixels, plus the last one flush with the border."""
    if not 0 < patch <= size:
        raise CutPasteError(f"patch size {patch} does not fit images of {size} px; use a patch size <= {size}")
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return torch.tensor(starts)


def grid_crops(n: int, height: int, width: int, patch: int, stride: int):
    """(image, top, left) index tensors of every patch on the stride grid of n images, in (image, row, col) order."""
    ys, xs = patch_positions(height, patch, stride), patch_positions(width, patch, stride)
    img = torch.arange(n).repeat_interleave(len(ys) * len(xs))
    return img, ys.repeat_interleave(len(xs)).repeat(n), xs.repeat(n * len(ys))


def cell_crops(n: int, height: int, width: int, patch: int, cell_stride: int, seed: int = 0):
    """(image, top, left, cell): one patch per image and cell of the `cell_stride` grid (row by row), moved by a
    seeded offset in [-cell_stride/2, cell_stride/2) so that clean patches cover every position, not only the
    grid's (on aligned objects, positions never seen in training would look anomalous)."""
    ys, xs = patch_positions(height, patch, cell_stride), patch_positions(width, patch, cell_stride)
    cells = len(ys) * len(xs)
    cell = torch.arange(cells).repeat(n)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(-(cell_stride // 2), cell_stride - cell_stride // 2, (2, n * cells), generator=gen)
    top = (ys[cell // len(xs)] + offsets[0]).clamp(0, height - patch)
    left = (xs[cell % len(xs)] + offsets[1]).clamp(0, width - patch)
    return torch.arange(n).repeat_interleave(cells), top, left, cell


def nearest_cells(height: int, width: int, patch: int, stride: int, cell_stride: int) -> torch.Tensor:
    """(rows * cols,) the location cell nearest to each patch of the stride grid, row by row."""
    ys, xs = patch_positions(height, patch, stride), patch_positions(width, patch, stride)
    cy, cx = patch_positions(height, patch, cell_stride), patch_positions(width, patch, cell_stride)
    iy = (ys.view(-1, 1) - cy.view(1, -1)).abs().argmin(dim=1)
    ix = (xs.view(-1, 1) - cx.view(1, -1)).abs().argmin(dim=1)
    return (iy.view(-1, 1) * len(cx) + ix.view(1, -1)).flatten()


@dataclass(frozen=True)
class PatchEmbedder:
    """Embeds crops of uint8 images in batches (no gradients): the clean patches the Gaussians are fitted on.
    `progress=False` for a caller with a progress bar of its own."""
    model: torch.nn.Module
    device: torch.device
    amp: bool = False
    channels_last: bool = False
    batch: int = PATCH_BATCH
    progress: bool = True

    @torch.inference_mode()
    def embed(self, images_u8: torch.Tensor, crops, patch: int, desc: str = "patches") -> torch.Tensor:
        """(B, D) L2-normalised float32 embeddings of `crops` = (image, top, left) index tensors, on the device."""
        was_training = self.model.training
        self.model.eval()
        images = images_u8.to(self.device)
        img, top, left = (t.to(self.device) for t in crops)
        fmt = memory_format(self.channels_last)
        out = []
        for start in tqdm(range(0, len(img), self.batch), desc=desc, leave=False, dynamic_ncols=True,
                          disable=not self.progress or len(img) <= 4 * self.batch):
            part = slice(start, min(start + self.batch, len(img)))
            x = apply_crops(images, img[part], top[part], left[part], patch)
            with autocast(self.device, self.amp):
                embeds = self.model.embed(x.float().div_(255).contiguous(memory_format=fmt))
            out.append(density_lib.normalize(embeds))
        self.model.train(was_training)
        return torch.cat(out)


@dataclass(frozen=True)
class CellPatches:
    """Normalised embeddings (M, D) of clean training patches, each patch's image (M,) and location cell (M,)."""
    embeds: torch.Tensor
    image: torch.Tensor
    cell: torch.Tensor


def embed_cells(embedder: PatchEmbedder, train_u8: torch.Tensor, patch: int,
                cell_stride: int = CELL_STRIDE) -> CellPatches:
    """The cell_crops of the clean images, embedded: what the patch Gaussians are fitted on."""
    n, _, h, w = train_u8.shape
    img, top, left, cells = cell_crops(n, h, w, patch, cell_stride)
    embeds = embedder.embed(train_u8, (img, top, left), patch, desc="embed training patches")
    return CellPatches(embeds, img, cells.to(embeds.device))


def fit_patch_density(fitted: CellPatches, n_images: int, kind: str = "torch", local: bool = False):
    """PatchGaussians fitted on the clean patches, and each training image's largest patch score (n_images,)."""
    density = density_lib.PatchGaussians(kind, local).fit(fitted.embeds, fitted.cell)
    return density, density.score(fitted.embeds, fitted.cell).view(n_images, -1).amax(dim=1)


def receptive_field_weights(size: int, starts: torch.Tensor, patch: int, sigma: float = SMOOTHING_SIGMA):
    """(size, len(starts)) float64: a Gaussian (sigma) around each patch's centre, zero outside the patch."""
    pix, lo = torch.arange(size, dtype=torch.float64).view(-1, 1), starts.double().view(1, -1)
    inside = (pix >= lo) & (pix < lo + patch)
    return torch.exp(-((pix - lo - (patch - 1) / 2) ** 2) / (2 * sigma ** 2)) * inside


class ReceptiveFieldUpsample(torch.nn.Module):
    """Receptive-field upsampling (FCDD; section 4.2) of patch scores (N, rows, cols) to maps (N, height, width): a
    transposed convolution with a Gaussian over each patch, divided by that of ones, i.e. a weighted mean per pixel,
    wy @ g @ wx.T / (wy @ 1 @ wx.T), which is wy' @ g @ wx'.T with each weight row normalised."""

    def __init__(self, height: int, width: int, patch: int, stride: int, sigma: float = SMOOTHING_SIGMA):
        super().__init__()
        for name, side in (("wy", height), ("wx", width)):
            weights = receptive_field_weights(side, patch_positions(side, patch, stride), patch, sigma)
            self.register_buffer(name, (weights / weights.sum(dim=1, keepdim=True)).float(), persistent=False)

    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        return self.wy @ grids @ self.wx.T


def heldout_map_maxima(embedder: PatchEmbedder, train_u8: torch.Tensor, patch: int, stride: int,
                       fitted: CellPatches, folds: int = density_lib.HELDOUT_FOLDS) -> torch.Tensor:
    """(N,) each clean image's dense-map maximum at `stride` under a shared patch Gaussian fitted, on the `fitted`
    patches, without its fold (empty if N < 3): predict.py's threshold for a patch-level model, as heldout_scores
    is for an image-level one."""
    n, _, h, w = train_u8.shape
    if n < 3:
        return torch.empty(0)
    fit, img = fitted.embeds.cpu(), fitted.image
    grid = embedder.embed(train_u8, grid_crops(n, h, w, patch, stride), patch, desc="score held-out patches").cpu()
    rows, cols = len(patch_positions(h, patch, stride)), len(patch_positions(w, patch, stride))
    grid = grid.view(n, rows * cols, -1)
    upsample = ReceptiveFieldUpsample(h, w, patch, stride)

    def score_fold(held):
        gaussian = density_lib.make_density("torch").fit(fit[~held[img]])
        return upsample(gaussian.score(grid[held].flatten(0, 1)).view(-1, rows, cols)).amax(dim=(1, 2))
    return density_lib.heldout(n, score_fold, folds)
