"""Defect localization (Li et al., CVPR 2021, sections 2.4 and 4.2): patch-level training batches,
dense patch scoring with receptive-field Gaussian upsampling, and GradCAM for image-level models.

Shapes: images are uint8 (N, 3, H, W); anomaly maps are float32 (N, H, W) on the CPU, larger = more
anomalous. The model is model.ProjectionNet (any image size: the backbone pools globally).
"""
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

import density as density_lib
import engine
import metrics
import plots
from common import CutPasteError, autocast
from cutpaste import augment_batch, sample_indices

# Section 4.2: "We train models of 64x64 patches from 256x256 image ... densely extract anomaly
# scores with a stride of 4". (Appendix A.5 says 32x32 patches; the main text's 64 is our default.)
PAPER_PATCH_SIZE = 64
PAPER_STRIDE = 4
# Smallest trainable patch: ResNet18 downsamples 32x, and below 32 px its last block would see a single
# pixel. (torch 2.14's CPU bf16 convolution also returns garbage weight gradients for 1 x 1 inputs.)
MIN_PATCH_SIZE = 32
# Width of the Gaussian that spreads each patch score over its receptive field (the patch), as the
# receptive-field upsampling of Liznerski et al. (FCDD, ICLR 2021) that section 4.2 cites.
SMOOTHING_SIGMA = 4.0
# Location cells of the patch-level Gaussians: the patch grid at this stride (13 x 13 cells for 64 px patches
# of 256 px images). The clean training patches are drawn one per image and cell, so the fit costs about as
# much as scoring a dozen test images at stride 4.
CELL_STRIDE = 16
# Li et al., appendix A.5: for "aligned objects" one Gaussian per location; for the randomly rotated
# objects (hazelnut, screw) and the textures, one Gaussian for all locations.
ALIGNED_CATEGORIES = ("bottle", "cable", "capsule", "metal_nut", "pill", "toothbrush", "transistor", "zipper")
PATCH_DENSITIES = ("auto", "shared", "local")
# Patches per forward pass in dense scoring (no gradients, so large batches pay off).
PATCH_BATCH = 512
# Images per forward/backward pass in GradCAM.
GRADCAM_BATCH = 16
# Dense scoring of an image-level model uses patches of this fraction of the image side (64 of 256).
IMAGE_MODEL_PATCH_FRACTION = 0.25
MODES = ("auto", "none", "dense", "gradcam")
GRADCAM_TARGETS = ("density", "logit")
# Quantiles of a category's map values that span the colour scale of its heatmap figures.
HEATMAP_PERCENTILES = (0.01, 0.99)
PAPER_TABLE2 = Path(__file__).resolve().parent / "doc" / "paper_table2.csv"


# ---- patch-level training (section 2.4, equation 3) ----

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
    """A batch for the patch-level model: random patch x patch crops c(x), then CutPaste inside each crop.

    Returns x (k * batch_size, 3, patch, patch) float in [0, 1] and labels, as cutpaste.make_batch.
    """
    n, _, h, w = images_u8.shape
    idx = sample_indices(n, batch_size, gen)
    top, left = sample_crops(batch_size, h, w, patch, gen)
    crops = apply_crops(images_u8, idx, top, left, patch)
    return augment_batch(crops.float().div_(255), variant, gen)


# ---- dense scoring ----

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
    """(image, top, left, cell): one patch per image and location cell, moved from the cell's grid position by
    a seeded random offset in [-cell_stride/2, cell_stride/2) on each axis (clamped into the image).

    Cells are the patch grid at `cell_stride`, numbered row by row. The offsets make the clean patches
    cover every position, not only the grid's: on aligned objects, test patches at positions never seen
    in training would look anomalous everywhere."""
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
class Runner:
    """How patches go through the network: the model, its device, bf16 autocast, memory format, batch size, and
    whether long passes show a progress bar (a caller with a bar of its own turns it off)."""
    model: torch.nn.Module
    device: torch.device
    amp: bool = False
    channels_last: bool = False
    batch: int = PATCH_BATCH
    progress: bool = True

    @torch.inference_mode()
    def over_crops(self, images_u8: torch.Tensor, crops, patch: int, reduce, desc: str = "patches"):
        """torch.cat of reduce(embeddings (B, D) float32, part) over the patches `crops` = (image, top, left),
        taken `batch` at a time; `part` is the slice of `crops` in the batch. The model's mode is restored."""
        was_training = self.model.training
        self.model.eval()
        images = images_u8.to(self.device)
        img, top, left = (t.to(self.device) for t in crops)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = []
        for start in tqdm(range(0, len(img), self.batch), desc=desc, leave=False, dynamic_ncols=True,
                          disable=not self.progress or len(img) <= 4 * self.batch):
            part = slice(start, min(start + self.batch, len(img)))
            x = apply_crops(images, img[part], top[part], left[part], patch)
            with autocast(self.device, self.amp):
                embeds = self.model.embed(x.float().div_(255).contiguous(memory_format=fmt))
            out.append(reduce(embeds.float(), part))
        self.model.train(was_training)
        return torch.cat(out)


class PatchGaussians:
    """Gaussians (density.py: Mahalanobis distance, Ledoit-Wolf covariance) on L2-normalised patch embeddings:
    one shared by all positions, or one per location cell (`local`), as Li et al. (appendix A.5) do for
    aligned objects, where a patch normal in one place (a rim) is a defect in another (the bottle's floor)."""

    def __init__(self, kind: str = "torch", local: bool = False):
        self.kind, self.local = kind, local

    def fit(self, embeds: torch.Tensor, cells: torch.Tensor) -> "PatchGaussians":
        """embeds (N, D) normalised; cells (N,) location cell of each patch."""
        groups = cells if self.local else torch.zeros_like(cells)
        self.parts = [density_lib.make_density(self.kind).fit(embeds[groups == c])
                      for c in range(int(groups.max()) + 1)]
        return self

    def score(self, embeds: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(N, D) normalised embeddings and their (N,) cells -> (N,) Mahalanobis distances."""
        groups = cells if self.local else torch.zeros_like(cells)
        out = torch.empty(len(embeds), device=embeds.device)
        for c in groups.unique().tolist():
            rows = groups == c
            out[rows] = self.parts[c].score(embeds[rows]).float().to(out.device)
        return out

    def state_dict(self) -> dict:
        states = [part.state_dict() for part in self.parts]
        if not self.local:
            return states[0]
        return {"kind": f"{self.kind}-per-location", "mean": torch.stack([st["mean"] for st in states]),
                "precision": torch.stack([st["precision"] for st in states])}


def fit_patch_density(runner: Runner, train_u8: torch.Tensor, patch: int, kind: str = "torch",
                      local: bool = False, cell_stride: int = CELL_STRIDE):
    """PatchGaussians fitted on one patch per clean training image and location cell (cell_crops); returns it
    and each training image's largest patch score (N,)."""
    n, _, h, w = train_u8.shape
    img, top, left, cells = cell_crops(n, h, w, patch, cell_stride)
    embeds = runner.over_crops(train_u8, (img, top, left), patch, lambda e, _: density_lib.normalize(e),
                               desc="embed training patches")
    cells = cells.to(embeds.device)
    density = PatchGaussians(kind, local).fit(embeds, cells)
    return density, density.score(embeds, cells).view(n, -1).amax(dim=1)


def score_grids(runner: Runner, density: PatchGaussians, images_u8: torch.Tensor, patch: int, stride: int,
                cell_stride: int = CELL_STRIDE) -> torch.Tensor:
    """Patch anomaly scores (N, rows, cols) on the stride grid, float32 on the CPU; each patch is scored by
    the Gaussian of its nearest location cell (or the shared one)."""
    n, _, h, w = images_u8.shape
    cell_of = nearest_cells(h, w, patch, stride, cell_stride).to(runner.device)

    def reduce(embeds, part):
        where = torch.arange(part.start, part.stop, device=runner.device) % len(cell_of)
        return density.score(density_lib.normalize(embeds), cell_of[where]).cpu()

    scores = runner.over_crops(images_u8, grid_crops(n, h, w, patch, stride), patch, reduce,
                               desc="score test patches")
    return scores.view(n, len(patch_positions(h, patch, stride)), len(patch_positions(w, patch, stride)))


def receptive_field_weights(size: int, starts: torch.Tensor, patch: int, sigma: float = SMOOTHING_SIGMA):
    """(size, len(starts)) float64: a Gaussian (sigma) around each patch's centre, zero outside the patch."""
    pix = torch.arange(size, dtype=torch.float64).view(-1, 1)
    lo = starts.double().view(1, -1)
    centre = lo + (patch - 1) / 2
    inside = (pix >= lo) & (pix < lo + patch)
    return torch.exp(-((pix - centre) ** 2) / (2 * sigma ** 2)) * inside


def upsample_scores(grids: torch.Tensor, height: int, width: int, patch: int, stride: int,
                    sigma: float = SMOOTHING_SIGMA) -> torch.Tensor:
    """Receptive-field upsampling (FCDD; section 4.2): each patch score spread over its patch with a
    Gaussian kernel, i.e. the transposed convolution of the (N, rows, cols) grid with a patch x patch
    Gaussian at `stride`, divided by the same transposed convolution of ones so that every pixel gets a
    weighted mean of the scores of the patches covering it. Returns (N, height, width) float32."""
    wy = receptive_field_weights(height, patch_positions(height, patch, stride), patch, sigma)
    wx = receptive_field_weights(width, patch_positions(width, patch, stride), patch, sigma)
    num = wy @ grids.double() @ wx.T
    den = wy @ torch.ones(grids.shape[1:], dtype=torch.float64) @ wx.T
    return (num / den).float()


def dense_maps(runner: Runner, train_u8: torch.Tensor, test_u8: torch.Tensor, patch: int, stride: int,
               kind: str = "torch", local: bool = False, cell_stride: int = CELL_STRIDE) -> torch.Tensor:
    """Anomaly maps (N, H, W) of the test images: Gaussians fitted on clean training patches, every test patch
    at `stride` scored, the scores upsampled to the image size."""
    density, _ = fit_patch_density(runner, train_u8, patch, kind, local, cell_stride)
    grids = score_grids(runner, density, test_u8, patch, stride, cell_stride)
    return upsample_scores(grids, test_u8.shape[2], test_u8.shape[3], patch, stride)


# ---- GradCAM (Selvaraju et al., ICCV 2017) for image-level models ----

def augmented_log_odds(embeds: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """GradCAM target 'logit': (B, K) logits -> (B,) log-odds that an image is augmented (any class > 0)
    rather than clean (class 0), as the self-supervised classifier sees it."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def density_target(density: density_lib.GaussianDensityTorch):
    """GradCAM target 'density': the anomaly detector's own score, the negative Gaussian log-density of the
    L2-normalised embedding up to a constant, (f - mu)^T Sigma^-1 (f - mu) / 2 (section 2.3, equation 2)."""
    def target(embeds: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        diff = density_lib.normalize(embeds) - density.mean
        return 0.5 * torch.einsum("nd,de,ne->n", diff, density.precision, diff)
    return target


def gradcam_maps(model, images_u8: torch.Tensor, target, device: torch.device, amp: bool, channels_last: bool,
                 batch: int = GRADCAM_BATCH) -> torch.Tensor:
    """GradCAM heatmaps (N, H, W): the last convolutional block's feature maps (ResNet18 layer4) weighted by
    the spatial mean of their gradients of target(embeds (B, D), logits (B, K)) -> (B,), summed over
    channels, ReLU'd and bilinearly resized to the image.

    Maps are not normalised per image, so that pixel metrics compare them across images."""
    was_training = model.training
    model.eval()
    captured = {}
    hook = model.resnet18.layer4.register_forward_hook(lambda _m, _i, out: captured.update(features=out))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    maps = []
    try:
        for start in range(0, images_u8.shape[0], batch):
            x = images_u8[start:start + batch].to(device).float().div_(255).contiguous(memory_format=fmt)
            with torch.enable_grad(), autocast(device, amp):
                embeds, logits = model(x)
                features = captured["features"]
                (grads,) = torch.autograd.grad(target(embeds.float(), logits.float()).sum(), features)
            weights = grads.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))
            maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(maps)


def gradcam_target(name: str, density: density_lib.GaussianDensityTorch | None = None):
    """--gradcam_target: 'density' (the detector's Gaussian of the clean training embeddings) or 'logit'."""
    if name == "logit":
        return augmented_log_odds
    if density is None:
        raise ValueError("GradCAM target 'density' needs the image-level Gaussian")
    return density_target(density)


# ---- evaluation helpers ----

def resolve_mode(requested: str, patch_size: int, path) -> str:
    """--localization: 'auto' is dense for patch-level models and none for image-level ones."""
    if requested not in MODES:
        raise CutPasteError(f"unknown --localization {requested!r}; choose one of {', '.join(MODES)}")
    if requested == "auto":
        return "dense" if patch_size else "none"
    if requested == "gradcam" and patch_size:
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {patch_size}); GradCAM explains "
                            f"image-level models: use --localization dense for it")
    if requested == "none" and patch_size:
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {patch_size}); its image score comes "
                            f"from its anomaly map: use --localization dense (or auto)")
    return requested


def dense_patch_size(patch_size: int, image_size: int) -> int:
    """The checkpoint's patch size; for an image-level model, a quarter of the image side (64 of 256)."""
    return patch_size or max(1, round(image_size * IMAGE_MODEL_PATCH_FRACTION))


def scorable_images(test_set, category: str) -> torch.Tensor:
    """(N,) bool: images whose pixels can be scored. Good images without a mask are all-good pixels;
    defective images without a usable mask are left out of the pixel metrics, with a warning."""
    keep = test_set.has_mask.clone()
    dropped = [str(test_set.items[i].path) for i in torch.nonzero(~keep).flatten().tolist()]
    if dropped:
        warnings.warn(f"{category}: {len(dropped)} defective test image(s) have no usable mask and are left out "
                      f"of the pixel metrics: {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
    return keep


def pixel_metrics(masks: torch.Tensor, maps: torch.Tensor) -> dict:
    """Pixel AUROC and PRO (metrics.py) of the maps against the masks, as fractions."""
    masks_np, maps_np = masks.cpu().numpy().astype(bool), maps.cpu().numpy()
    return {"pixel_auroc": metrics.pixel_auroc(masks_np, maps_np), "pro": metrics.pro_score(masks_np, maps_np)}


def heatmap_indices(n: int, limit: int) -> list[int]:
    """At most `limit` test images spread evenly over the sorted test set (so over good and each defect type)."""
    if limit <= 0 or n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(limit, n)).round().astype(int).tolist()))


def display_range(maps: torch.Tensor) -> tuple[float, float]:
    """One colour scale for all heatmaps of a category: the 1st to the 99th percentile of its map values,
    so that good images look calm and the few most extreme pixels cannot wash every other map out."""
    sample = maps.flatten()
    if sample.numel() > 2_000_000:
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    lo, hi = torch.quantile(sample.double(), torch.tensor(HEATMAP_PERCENTILES, dtype=torch.float64)).tolist()
    return lo, hi if hi > lo else lo + 1e-6


def paper_pixel_auroc(category: str, mode: str) -> float:
    """The paper's Table 2 pixel AUROC (%) for dense scoring of this category; NaN where it gives none."""
    table = pd.read_csv(PAPER_TABLE2, comment="#").set_index("category")
    if mode not in table.columns or category not in table.index:
        return float("nan")
    return float(table.loc[category, mode])


def check_eval_args(args) -> None:
    """eval.py's localization flags, validated with a message that names the flag."""
    for name in ("stride", "cell_stride", "patch_batch"):
        if getattr(args, name) < 1:
            raise CutPasteError(f"--{name} {getattr(args, name)} is out of range; give a positive number")
    if args.max_heatmaps < 0:
        raise CutPasteError(f"--max_heatmaps {args.max_heatmaps} is negative; give 0 (no heatmaps) or more")


def use_local_density(patch_density: str, category: str) -> bool:
    """--patch_density: 'auto' is per-location for the aligned objects of appendix A.5, shared otherwise."""
    if patch_density not in PATCH_DENSITIES:
        raise CutPasteError(f"unknown --patch_density {patch_density!r}; choose one of {', '.join(PATCH_DENSITIES)}")
    return patch_density == "local" or (patch_density == "auto" and category in ALIGNED_CATEGORIES)


def compute_maps(mode: str, category: str, model, train_u8: torch.Tensor | None, test_u8: torch.Tensor,
                 patch_size: int, args, device: torch.device, density=None):
    """Anomaly maps (N, H, W) of the test images for --localization `mode` (None for 'none'), and what made
    them: {"localization": mode, "patch_density": "local", "shared" or ""}.

    Dense scoring fits its patch Gaussians on the clean training images `train_u8`; GradCAM's 'density' target
    is the image-level Gaussian `density` (a torch or sklearn estimator from density.py).

    args supplies eval.py's stride, patch_density, cell_stride, density, patch_batch, gradcam_target, amp and
    channels_last."""
    info = {"localization": mode, "patch_density": ""}
    if mode == "gradcam":
        info["gradcam_target"] = args.gradcam_target
        torch_density = None if density is None else density_lib.as_torch(density, device)  # differentiable
        target = gradcam_target(args.gradcam_target, torch_density)
        return gradcam_maps(model, test_u8, target, device, args.amp, args.channels_last), info
    if mode == "dense":
        local = use_local_density(args.patch_density, category)
        info["patch_density"] = "local" if local else "shared"
        runner = Runner(model, device, args.amp, args.channels_last, args.patch_batch)
        patch = dense_patch_size(patch_size, test_u8.shape[-1])
        kind = args.density if args.density in density_lib.DENSITIES else "torch"  # patch Gaussians are refitted
        return dense_maps(runner, train_u8, test_u8, patch, args.stride, kind, local, args.cell_stride), info
    return None, info


def report(category: str, test_set, maps: torch.Tensor, info: dict, out: Path, save_plots: bool,
           max_heatmaps: int) -> dict:
    """Pixel metrics of the maps (in %), the image AUROC of the maps' maxima, and the figures under `out`:
    pixel_roc.png and heatmaps/<defect>_<image>.png for at most `max_heatmaps` test images."""
    keep = scorable_images(test_set, category)
    masks = test_set.masks[keep]
    scores = pixel_metrics(masks, maps[keep])
    mode = info["localization"]
    row = {**info, "pixel_auroc": 100 * scores["pixel_auroc"], "pro": 100 * scores["pro"],
           "paper_pixel_auroc": paper_pixel_auroc(category, mode),
           "map_image_auroc": 100 * engine.image_auroc(test_set.labels, maps.amax(dim=(1, 2)))}
    how = {"dense": f"dense, {info['patch_density']} Gaussian",
           "gradcam": f"GradCAM of the {info.get('gradcam_target')} score"}.get(mode, mode)
    print(f"{category} pixel AUROC: {scores['pixel_auroc']:.4f}  PRO: {scores['pro']:.4f}  ({how})")
    if save_plots:
        labels = masks.flatten().numpy()
        if 0 < labels.sum() < labels.size:
            plots.plot_roc(labels, maps[keep].flatten().numpy(), scores["pixel_auroc"],
                           f"{category}: pixel ROC ({mode})", out / "pixel_roc.png")
        save_heatmaps(test_set, maps, out / "heatmaps", max_heatmaps)
    return row


def save_heatmaps(test_set, maps: torch.Tensor, folder: Path, limit: int) -> list[Path]:
    """Image, mask and overlay for at most `limit` test images, on one colour scale for the category."""
    vmin, vmax = display_range(maps)
    paths = []
    for i in heatmap_indices(len(test_set), limit):
        item = test_set.items[i]
        mask = test_set.masks[i].numpy() if bool(test_set.has_mask[i]) else None
        paths.append(plots.plot_heatmap(test_set.images[i].permute(1, 2, 0).numpy(), mask, maps[i].numpy(),
                                        vmin, vmax, f"{item.defect}/{item.path.name}",
                                        folder / f"{item.defect}_{item.path.stem}.png"))
    return paths
