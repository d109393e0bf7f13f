"""Defect localization (Li et al., CVPR 2021, sections 2.4 and 4.2): patch-level training batches,
dense patch scoring with receptive-field Gaussian upsampling, and GradCAM for image-level models.

Shapes: images are uint8 (N, 3, H, W); anomaly maps are float32 (N, H, W) on the CPU, larger = more
anomalous. The model is model.ProjectionNet (any image size: the backbone pools globally).
"""
import warnings
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
# Width of the Gaussian that spreads each patch score over its receptive field (the patch), as the
# receptive-field upsampling of Liznerski et al. (FCDD, ICLR 2021) that section 4.2 cites.
SMOOTHING_SIGMA = 4.0
# Stride of the patches of clean training images that the patch-level Gaussian is fitted on: 169
# patches per 256 px image, so that fitting costs about as much as scoring a few test images.
DENSITY_STRIDE = 16
# Patches per forward pass in dense scoring (no gradients, so large batches pay off).
PATCH_BATCH = 512
# Images per forward/backward pass in GradCAM.
GRADCAM_BATCH = 16
# Dense scoring of an image-level model uses patches of this fraction of the image side (64 of 256).
IMAGE_MODEL_PATCH_FRACTION = 0.25
MODES = ("auto", "none", "dense", "gradcam")
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


@torch.inference_mode()
def over_patches(model, images_u8: torch.Tensor, patch: int, stride: int, reduce, device: torch.device,
                 amp: bool, channels_last: bool, batch: int = PATCH_BATCH, desc: str = "patches") -> torch.Tensor:
    """reduce(embeddings (B, D) float32) for every patch of every image, batched, concatenated in
    (image, row, column) order; returns the concatenation and leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    images = images_u8.to(device)
    n, _, h, w = images.shape
    ys, xs = patch_positions(h, patch, stride).to(device), patch_positions(w, patch, stride).to(device)
    per_image = len(ys) * len(xs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for start in tqdm(range(0, n * per_image, batch), desc=desc, leave=False, dynamic_ncols=True,
                      disable=n * per_image <= 4 * batch):
        k = torch.arange(start, min(start + batch, n * per_image), device=device)
        img, cell = k // per_image, k % per_image
        crops = apply_crops(images, img, ys[cell // len(xs)], xs[cell % len(xs)], patch)
        with autocast(device, amp):
            embeds = model.embed(crops.float().div_(255).contiguous(memory_format=fmt))
        out.append(reduce(embeds.float()))
    model.train(was_training)
    return torch.cat(out)


def fit_patch_density(model, train_u8: torch.Tensor, patch: int, device: torch.device, amp: bool,
                      channels_last: bool, kind: str = "torch", stride: int = DENSITY_STRIDE):
    """The Gaussian (density.py) fitted on L2-normalised embeddings of the clean training images' patches
    at `stride`; returns it and each training image's largest patch score (N,)."""
    embeds = over_patches(model, train_u8, patch, stride, density_lib.normalize, device, amp, channels_last,
                          desc="embed training patches")
    density = density_lib.make_density(kind).fit(embeds)
    return density, density.score(embeds).view(train_u8.shape[0], -1).amax(dim=1)


def score_grids(model, density, images_u8: torch.Tensor, patch: int, stride: int, device: torch.device,
                amp: bool, channels_last: bool, batch: int = PATCH_BATCH) -> torch.Tensor:
    """Patch anomaly scores (N, rows, cols) on the patch grid, float32 on the CPU."""
    n, _, h, w = images_u8.shape
    scores = over_patches(model, images_u8, patch, stride,
                          lambda e: density.score(density_lib.normalize(e)).float().cpu(),
                          device, amp, channels_last, batch, desc="score test patches")
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


def dense_maps(model, train_u8: torch.Tensor, test_u8: torch.Tensor, patch: int, stride: int,
               device: torch.device, amp: bool, channels_last: bool, kind: str = "torch",
               density_stride: int = DENSITY_STRIDE, batch: int = PATCH_BATCH) -> torch.Tensor:
    """Anomaly maps (N, H, W) of the test images: Gaussian fitted on training patches, test patches scored
    at `stride`, upsampled to the image size."""
    density, _ = fit_patch_density(model, train_u8, patch, device, amp, channels_last, kind, density_stride)
    grids = score_grids(model, density, test_u8, patch, stride, device, amp, channels_last, batch)
    return upsample_scores(grids, test_u8.shape[2], test_u8.shape[3], patch, stride)


# ---- GradCAM (Selvaraju et al., ICCV 2017) for image-level models ----

def augmented_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B,) log-odds that an image is augmented (any class > 0) rather than clean (class 0)."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def gradcam_maps(model, images_u8: torch.Tensor, device: torch.device, amp: bool, channels_last: bool,
                 batch: int = GRADCAM_BATCH) -> torch.Tensor:
    """GradCAM heatmaps (N, H, W): the last convolutional block's feature maps (ResNet18 layer4) weighted by
    the spatial mean of their gradients of augmented_log_odds, summed, ReLU'd, bilinearly resized.

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
                _, logits = model(x)
                features = captured["features"]
                (grads,) = torch.autograd.grad(augmented_log_odds(logits.float()).sum(), features)
            weights = grads.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))
            maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].cpu())
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(maps)


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
    """One colour scale for all heatmaps of a category: the 1st to the 99.9th percentile of its map values,
    so that good images look calm and a single extreme pixel cannot wash every map out."""
    sample = maps.flatten()
    if sample.numel() > 2_000_000:
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    lo, hi = torch.quantile(sample.double(), torch.tensor([0.01, 0.999], dtype=torch.float64)).tolist()
    return lo, hi if hi > lo else lo + 1e-6


def paper_pixel_auroc(category: str, mode: str) -> float:
    """The paper's Table 2 pixel AUROC (%) for dense scoring of this category; NaN where it gives none."""
    table = pd.read_csv(PAPER_TABLE2, comment="#").set_index("category")
    if mode not in table.columns or category not in table.index:
        return float("nan")
    return float(table.loc[category, mode])


def compute_maps(mode: str, model, train_u8: torch.Tensor, test_u8: torch.Tensor, patch_size: int, args,
                 device: torch.device) -> torch.Tensor | None:
    """Anomaly maps (N, H, W) of the test images for --localization `mode` ('none' gives None).

    args supplies stride, density, density_stride, patch_batch, amp and channels_last (eval.py's flags)."""
    if mode == "gradcam":
        return gradcam_maps(model, test_u8, device, args.amp, args.channels_last)
    if mode == "dense":
        patch = dense_patch_size(patch_size, test_u8.shape[-1])
        return dense_maps(model, train_u8, test_u8, patch, args.stride, device, args.amp, args.channels_last,
                          args.density, args.density_stride, args.patch_batch)
    return None


def report(category: str, test_set, maps: torch.Tensor, mode: str, out: Path, save_plots: bool,
           max_heatmaps: int) -> dict:
    """Pixel metrics of the maps (in %), the image AUROC of the maps' maxima, and the figures under `out`:
    pixel_roc.png and heatmaps/<defect>_<image>.png for at most `max_heatmaps` test images."""
    keep = scorable_images(test_set, category)
    masks = test_set.masks[keep]
    scores = pixel_metrics(masks, maps[keep])
    row = {"localization": mode, "pixel_auroc": 100 * scores["pixel_auroc"], "pro": 100 * scores["pro"],
           "paper_pixel_auroc": paper_pixel_auroc(category, mode),
           "map_image_auroc": 100 * engine.image_auroc(test_set.labels, maps.amax(dim=(1, 2)))}
    print(f"{category} pixel AUROC: {scores['pixel_auroc']:.4f}  PRO: {scores['pro']:.4f}  ({mode})")
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
