"""CutPaste augmentations (Li et al., CVPR 2021, section 3.1), batched on the training device.

Every augmentation is split in two: `sample_*` draws its parameters from one injected
torch.Generator, and `apply_*` is a pure function of the images and those parameters that
returns a new tensor and never touches its input. The same seed gives the same batch.

Images are float tensors in [0, 1] of shape (B, 3, H, W); H and W may differ.
"""
import math
from dataclasses import dataclass

import torch

# Section 3.1: "area ratio ... in (0.02, 0.15)" and aspect ratio log-uniform in (0.3, 1/0.3).
CUTPASTE_AREA_RATIO = (0.02, 0.15)
CUTPASTE_ASPECT_RATIO = (0.3, 1 / 0.3)
# CutPaste-scar: a thin box, width 2-16 px, height 10-25 px, rotated by up to 45 degrees.
SCAR_WIDTH = (2, 16)
SCAR_HEIGHT = (10, 25)
SCAR_MAX_ANGLE_DEG = 45.0
# Colour jitter strength for brightness, contrast, saturation and hue, as the earlier
# PyTorch reimplementation used (torchvision ColorJitter(0.1, 0.1, 0.1, 0.1)).
COLOR_JITTER = 0.1
# Output classes per variant: 0 is always the clean image.
VARIANT_CLASSES = {"normal": 2, "scar": 2, "union": 2, "3way": 3}
VARIANTS = tuple(VARIANT_CLASSES)
# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


def _randint(n: int, high, gen: torch.Generator) -> torch.Tensor:
    """Integers uniform in [0, high] (inclusive, per element)."""
    return torch.floor(torch.rand(n, generator=gen, device=gen.device) * (high + 1)).clamp(max=high)


@dataclass(frozen=True)
class JitterParams:
    """Per-image factors, each of shape (B,): brightness/contrast/saturation multipliers, hue shift in turns."""
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor


def sample_jitter(n: int, gen: torch.Generator, strength: float = COLOR_JITTER) -> JitterParams:
    """Factors as torchvision's ColorJitter(s, s, s, s) draws them: [1-s, 1+s] and hue in [-s, s]."""
    return JitterParams(*(_uniform(n, 1 - strength, 1 + strength, gen) for _ in range(3)),
                        _uniform(n, -strength, strength, gen))


def _luma(like: torch.Tensor) -> torch.Tensor:
    return like.new_tensor(_LUMA)


def _hue_rotation(hue: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB matrices rotating the chroma plane of YIQ by 2*pi*hue (greys stay fixed)."""
    to_yiq = hue.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    angle = 2 * math.pi * hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(hue.shape[0], 3, 3, device=hue.device, dtype=hue.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def jitter_affine(images: torch.Tensor, p: JitterParams):
    """The jitter as one colour transform per image: (B, 3, 3) matrices and (B, 3) offsets.

    Brightness (x -> b x), contrast (blend with the grey mean), saturation (blend with the
    greyscale image) and hue are each linear in x, so their composition is x -> M x + o.
    Contrast's grey mean is that of the brightness-scaled image, b * mean(gray(x)).
    """
    b = images.shape[0]
    luma = _luma(images).float()
    gray_mean = torch.einsum("c,bchw->b", luma, images.float()) / (images.shape[2] * images.shape[3])
    eye = torch.eye(3, device=images.device).expand(b, 3, 3)
    to_gray = torch.ones(3, 1, device=images.device) @ luma.view(1, 3)
    sat = p.saturation.view(-1, 1, 1)
    mats = _hue_rotation(p.hue.float()) @ (sat * eye + (1 - sat) * to_gray)
    mats = mats * (p.contrast * p.brightness).view(-1, 1, 1)
    # Hue and saturation fix greys, so the contrast offset passes through them unchanged.
    offset = ((1 - p.contrast) * p.brightness * gray_mean).view(-1, 1).expand(b, 3)
    return mats, offset


def apply_jitter(images: torch.Tensor, p: JitterParams) -> torch.Tensor:
    """Brightness, contrast, saturation, then hue, each with its own factor per image.

    Brightness/contrast/saturation follow torchvision's formulas (blend with black, the grey
    mean, the greyscale image); hue is a rotation of the YIQ chroma plane, a linear stand-in
    for torchvision's HSV hue shift. All four are fused into one affine colour transform and a
    single clamp to [0, 1] (torchvision clamps after each step; results differ only where an
    intermediate step leaves [0, 1]). One batched matrix product instead of a dozen image passes.
    """
    mats, offset = jitter_affine(images, p)
    out = torch.einsum("bij,bjhw->bihw", mats.to(images.dtype), images)
    return out.add_(offset.to(images.dtype).view(-1, 3, 1, 1)).clamp_(0, 1)


@dataclass(frozen=True)
class PasteParams:
    """Per-image (B,) geometry of a pasted patch, in pixels.

    The patch is the `height` x `width` box centred at (src_y, src_x) in the source image,
    rotated by `angle` (radians) and pasted centred at (dst_y, dst_x).
    """
    src_y: torch.Tensor
    src_x: torch.Tensor
    dst_y: torch.Tensor
    dst_x: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    angle: torch.Tensor


def _place_box(n, height, width, img_h, img_w, gen):
    """Box centres (y, x) for integer-aligned axis-parallel boxes that lie fully inside the image."""
    top = _randint(n, img_h - height, gen)
    left = _randint(n, img_w - width, gen)
    return top + (height - 1) / 2, left + (width - 1) / 2


def sample_cutpaste(n: int, img_h: int, img_w: int, gen: torch.Generator) -> PasteParams:
    """CutPaste boxes: area ratio uniform in CUTPASTE_AREA_RATIO of H*W, aspect log-uniform."""
    area = _uniform(n, *CUTPASTE_AREA_RATIO, gen) * img_h * img_w
    log_lo, log_hi = (math.log(r) for r in CUTPASTE_ASPECT_RATIO)
    aspect = torch.exp(_uniform(n, log_lo, log_hi, gen))  # width / height
    width = torch.sqrt(area * aspect).round().clamp(1, img_w)
    height = torch.sqrt(area / aspect).round().clamp(1, img_h)
    src_y, src_x = _place_box(n, height, width, img_h, img_w, gen)
    dst_y, dst_x = _place_box(n, height, width, img_h, img_w, gen)
    return PasteParams(src_y, src_x, dst_y, dst_x, height, width, torch.zeros_like(area))


def sample_scar(n: int, img_h: int, img_w: int, gen: torch.Generator) -> PasteParams:
    """CutPaste-scar boxes: integer width/height in SCAR_WIDTH/SCAR_HEIGHT, angle in +-SCAR_MAX_ANGLE_DEG.

    The destination centre keeps the whole rotated box inside the image.
    """
    width = (_randint(n, SCAR_WIDTH[1] - SCAR_WIDTH[0], gen) + SCAR_WIDTH[0]).clamp(max=img_w)
    height = (_randint(n, SCAR_HEIGHT[1] - SCAR_HEIGHT[0], gen) + SCAR_HEIGHT[0]).clamp(max=img_h)
    angle = torch.deg2rad(_uniform(n, -SCAR_MAX_ANGLE_DEG, SCAR_MAX_ANGLE_DEG, gen))
    src_y, src_x = _place_box(n, height, width, img_h, img_w, gen)
    cos, sin = torch.cos(angle).abs(), torch.sin(angle).abs()
    half_x = ((width * cos + height * sin) / 2).clamp(max=img_w / 2)
    half_y = ((width * sin + height * cos) / 2).clamp(max=img_h / 2)
    dst_x = half_x - 0.5 + torch.rand(n, generator=gen, device=gen.device) * (img_w - 2 * half_x)
    dst_y = half_y - 0.5 + torch.rand(n, generator=gen, device=gen.device) * (img_h - 2 * half_y)
    return PasteParams(src_y, src_x, dst_y, dst_x, height, width, angle)


def paste_mask_and_source(p: PasteParams, img_h: int, img_w: int):
    """Which pixels the patch covers, (B, H, W) bool, and the flat source index of each, (B, H, W) long.

    A destination pixel maps back to the source through the inverse rotation about the patch centre;
    with angle 0 this is an exact integer shift of an axis-parallel box.
    """
    dev = p.src_y.device
    ys = torch.arange(img_h, device=dev, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(img_w, device=dev, dtype=torch.float32).view(1, 1, -1)
    rel_y = ys - p.dst_y.view(-1, 1, 1)
    rel_x = xs - p.dst_x.view(-1, 1, 1)
    cos, sin = torch.cos(p.angle).view(-1, 1, 1), torch.sin(p.angle).view(-1, 1, 1)
    u = cos * rel_x + sin * rel_y  # patch-frame coordinates (inverse rotation)
    v = -sin * rel_x + cos * rel_y
    inside = (u.abs() < p.width.view(-1, 1, 1) / 2) & (v.abs() < p.height.view(-1, 1, 1) / 2)
    src_y = torch.floor(p.src_y.view(-1, 1, 1) + v + 0.5).clamp(0, img_h - 1)
    src_x = torch.floor(p.src_x.view(-1, 1, 1) + u + 0.5).clamp(0, img_w - 1)
    return inside, (src_y * img_w + src_x).long()


def apply_paste(images: torch.Tensor, patch_source: torch.Tensor, p: PasteParams) -> torch.Tensor:
    """Paste the patch described by `p`, read from `patch_source`, onto a copy of `images`."""
    b, c, h, w = images.shape
    inside, index = paste_mask_and_source(p, h, w)
    index = index.view(b, 1, h * w).expand(b, c, h * w)
    patch = torch.gather(patch_source.reshape(b, c, h * w), 2, index).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), patch, images)


def _select(mask: torch.Tensor, a: PasteParams, b: PasteParams) -> PasteParams:
    return PasteParams(*(torch.where(mask, getattr(a, f), getattr(b, f)) for f in PasteParams.__dataclass_fields__))


def cutpaste_views(images: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """One augmented view per image: 'cutpaste', 'scar' or 'union' (each image either, with p = 0.5).

    The patch comes from the same image and gets its own colour jitter (section 3.1).
    """
    n, _, h, w = images.shape
    if kind == "cutpaste":
        params = sample_cutpaste(n, h, w, gen)
    elif kind == "scar":
        params = sample_scar(n, h, w, gen)
    elif kind == "union":
        use_cp = torch.rand(n, generator=gen, device=gen.device) < 0.5
        params = _select(use_cp, sample_cutpaste(n, h, w, gen), sample_scar(n, h, w, gen))
    else:
        raise ValueError(f"unknown CutPaste kind {kind!r}")
    patch_source = apply_jitter(images, sample_jitter(n, gen))
    return apply_paste(images, patch_source, params)


def sample_indices(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Which of `n` training images fill a batch: distinct ones when there are enough, else with replacement."""
    if batch_size <= n:
        return torch.randperm(n, generator=gen, device=gen.device)[:batch_size]
    return torch.randint(n, (batch_size,), generator=gen, device=gen.device)


def augment_batch(base: torch.Tensor, variant: str, gen: torch.Generator):
    """The variant's self-supervised batch built from clean float images `base` (B, 3, H, W) in [0, 1].

    Returns x (k * B, 3, H, W) and labels (k * B,) long, with k the variant's class count: clean
    images (0), then CutPaste or union (1), then scar (2 in 3-way, 1 in the scar variant). Colour
    jitter is applied to the whole image first, as the earlier reimplementation did. The boxes are
    sampled for H x W, so with patches (section 2.4) CutPaste happens inside each patch.
    """
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    batch_size = base.shape[0]
    base = apply_jitter(base, sample_jitter(batch_size, gen))
    kinds = {"normal": ["cutpaste"], "scar": ["scar"], "union": ["union"], "3way": ["cutpaste", "scar"]}[variant]
    views = [base] + [cutpaste_views(base, kind, gen) for kind in kinds]
    labels = torch.arange(len(views), device=base.device).repeat_interleave(batch_size)
    return torch.cat(views), labels


def make_batch(images_u8: torch.Tensor, variant: str, batch_size: int, gen: torch.Generator):
    """Sample `batch_size` training images and build the variant's self-supervised batch (see augment_batch).

    images_u8: (N, 3, H, W) uint8 on the generator's device.
    Returns x (k * batch_size, 3, H, W) float in [0, 1] and labels (k * batch_size,) long.
    """
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    idx = sample_indices(images_u8.shape[0], batch_size, gen)
    return augment_batch(images_u8[idx].float().div_(255), variant, gen)
