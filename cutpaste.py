"""CutPaste (Li et al., CVPR 2021, section 3.1): augmented images that look like local defects, for a classifier to
tell from the clean ones, so that its embeddings notice local irregularities.

CutPaste cuts a rectangle out of a clean image, its area 2 % to 15 % of the image's and its aspect ratio (width /
height) log-uniform between 0.3 and 1 / 0.3, jitters the rectangle's colours (brightness, contrast, saturation and
hue, in a random order, as torchvision's ColorJitter does) and pastes it back at a random place of the same image.
CutPaste-scar cuts a thin box instead (2-16 px wide, 10-25 px tall) and pastes it turned by up to 45 degrees. The
variants: normal (clean against CutPaste), scar (clean against scar), union (clean against either, half and half)
and 3way (clean, CutPaste and scar as three classes). Every image, the clean ones too, first gets a colour jitter of
its own, as the earlier reimplementation does.

The module reads in that order:

1. The method. The parameters of a batch are drawn from one injected torch.Generator (`sample_cutpaste`,
   `sample_scar`, `sample_jitter`), apart from applying them; `cutpaste_image` applies image i's parameters to
   that one image: `cut_box`, `color_jitter` (torchvision's own functions), `paste_box`.
2. The batched path that training runs (`make_batch`): the same images for a whole batch on the training device,
   with fixed shapes and nothing read back to the host, so that a CUDA graph can capture a training step
   (training/cudagraphs.py). Each box is packed into a fixed number of slots, and the jitter runs stage by stage.
   tests/test_cutpaste.py checks that both paths give the same images for the same parameters.

Images are float (B, 3, H, W) in [0, 1], or (3, H, W) for one image; H and W may differ.
"""
import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from common.paper import VARIANTS

# Section 3.1: "area ratio ... in (0.02, 0.15)" and aspect ratio log-uniform in (0.3, 1/0.3).
CUTPASTE_AREA_RATIO = (0.02, 0.15)
CUTPASTE_ASPECT_RATIO = (0.3, 1 / 0.3)
# CutPaste-scar: a thin box, width 2-16 px, height 10-25 px, rotated by up to 45 degrees.
SCAR_WIDTH = (2, 16)
SCAR_HEIGHT = (10, 25)
SCAR_MAX_ANGLE_DEG = 45.0
# Colour jitter strength of the earlier reimplementation: torchvision ColorJitter(0.1, 0.1, 0.1, 0.1).
COLOR_JITTER = 0.1
# The jitter's steps, numbered as torchvision's ColorJitter numbers them in its random order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
JITTER_STEPS = 4
# Output classes per variant: 0 is always the clean image.
VARIANT_CLASSES = dict(zip(VARIANTS, (2, 2, 2, 3)))


# ---- 1. The method: parameters drawn from one generator, and their application to one image ----------------------


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, device=gen.device)


def _randint(n: int, high, gen: torch.Generator) -> torch.Tensor:
    """Integers uniform in [0, high] (inclusive, per element)."""
    return torch.floor(torch.rand(n, generator=gen, device=gen.device) * (high + 1)).clamp(max=high)


@dataclass(frozen=True)
class PasteParams:
    """Per-image (B,) geometry in pixels: the `height` x `width` box centred at (src_y, src_x), rotated by
    `angle` (radians) and pasted centred at (dst_y, dst_x)."""
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
    """Scar boxes: integer sides in SCAR_WIDTH/SCAR_HEIGHT, angle in +-SCAR_MAX_ANGLE_DEG, rotated box inside."""
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


@dataclass(frozen=True)
class JitterParams:
    """ColorJitter of each image: (B,) brightness, contrast and saturation factors and hue shift in turns; order
    (B, 4) long, the steps (BRIGHTNESS ... HUE) at stages 0-3. For the batched path: hue_rows (B,) the images
    sorted by the stage of their hue step, and hue_counts, host integers (so applying reads nothing back), how many
    images shift hue at each stage."""
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    hue_rows: torch.Tensor
    hue_counts: tuple


def jitter_params(brightness, contrast, saturation, hue, order=None) -> JitterParams:
    """JitterParams from explicit factors and (B, 4) step orders (default: torchvision's); reads `order` back."""
    n = brightness.shape[0]
    if order is None:
        order = torch.arange(JITTER_STEPS, device=brightness.device).expand(n, JITTER_STEPS)
    hue_stage = (order == HUE).long().argmax(dim=1)
    counts = torch.bincount(hue_stage, minlength=JITTER_STEPS).tolist()
    return JitterParams(brightness, contrast, saturation, hue, order,
                        torch.argsort(hue_stage, stable=True), tuple(counts))


def sample_jitter(n: int, gen: torch.Generator, strength: float = COLOR_JITTER) -> JitterParams:
    """Factors as torchvision's ColorJitter(s, s, s, s) draws them: [1-s, 1+s], hue in [-s, s]; each image's
    step order uniform over the 24, as randperm(4). Hue stages are dealt evenly over the batch (a permutation cut
    in quarters) so their counts are known without reading the device; the other steps order at random."""
    factors = [_uniform(n, 1 - strength, 1 + strength, gen) for _ in range(3)]
    hue = _uniform(n, -strength, strength, gen)
    dev = gen.device
    hue_rows = torch.randperm(n, generator=gen, device=dev)
    dealt = torch.arange(n, device=dev) * JITTER_STEPS // n
    hue_stage = torch.empty_like(dealt).scatter_(0, hue_rows, dealt)
    rank = torch.argsort(torch.rand(n, JITTER_STEPS - 1, generator=gen, device=dev), dim=1)
    stage = torch.cat([rank + (rank >= hue_stage.view(-1, 1)).long(), hue_stage.view(-1, 1)], dim=1)
    steps = torch.arange(JITTER_STEPS, device=dev).expand(n, JITTER_STEPS)
    order = torch.empty_like(stage).scatter_(1, stage, steps)
    dealt_host = [i * JITTER_STEPS // n for i in range(n)]
    counts = tuple(dealt_host.count(s) for s in range(JITTER_STEPS))
    return JitterParams(*factors, hue, order, hue_rows, counts)


def cut_box(image: torch.Tensor, p: PasteParams, i: int) -> torch.Tensor:
    """The source box of image i's parameters, cut out of `image` (3, H, W): a view (3, height, width)."""
    height, width = int(p.height[i]), int(p.width[i])
    top, left = int(p.src_y[i] - (height - 1) / 2), int(p.src_x[i] - (width - 1) / 2)
    return image[:, top:top + height, left:left + width]


def color_jitter(image: torch.Tensor, p: JitterParams, i: int) -> torch.Tensor:
    """torchvision's ColorJitter of `image` (3, h, w) with image i's factors, its four steps in image i's order."""
    steps = {BRIGHTNESS: (TF.adjust_brightness, p.brightness), CONTRAST: (TF.adjust_contrast, p.contrast),
             SATURATION: (TF.adjust_saturation, p.saturation), HUE: (TF.adjust_hue, p.hue)}
    for step in p.order[i].tolist():
        adjust, factors = steps[step]
        image = adjust(image, factors[i].item())
    return image


def paste_box(image: torch.Tensor, patch: torch.Tensor, p: PasteParams, i: int) -> torch.Tensor:
    """`patch` (3, h, w) pasted onto a copy of `image` (3, H, W), centred at image i's (dst_y, dst_x) and turned by
    its angle: a pixel whose centre, turned back by the angle about that point, falls inside the patch takes the
    patch's pixel there. With angle 0 the patch lands as it is, shifted by whole pixels."""
    height, width = patch.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(image.shape[1], dtype=torch.float64),
                            torch.arange(image.shape[2], dtype=torch.float64), indexing="ij")
    down, right = ys - float(p.dst_y[i]), xs - float(p.dst_x[i])
    cos, sin = math.cos(float(p.angle[i])), math.sin(float(p.angle[i]))
    across, along = cos * right + sin * down, cos * down - sin * right  # in the patch's frame, from its centre
    inside = (across.abs() < width / 2) & (along.abs() < height / 2)
    rows = (along[inside] + height / 2).floor().long()
    cols = (across[inside] + width / 2).floor().long()
    out = image.clone()
    out[:, inside] = patch[:, rows, cols]
    return out


def cutpaste_image(image: torch.Tensor, p: PasteParams, jitter: JitterParams, i: int) -> torch.Tensor:
    """CutPaste (or scar, by the parameters) of one image (3, H, W) with image i's parameters of a batch: cut the
    source box, jitter its colours, paste it at the destination."""
    return paste_box(image, color_jitter(cut_box(image, p, i), jitter, i), p, i)


# ---- 2. The batched path: the method on a whole batch on the training device, in fixed shapes and without reading
# the device back to the host, so that a CUDA graph can capture it (training/cudagraphs.py) ---------------------------

# Greyscale weights of torchvision's rgb_to_grayscale (ITU-R BT.601, red rounded as torchvision does).
_LUMA = (0.2989, 0.587, 0.114)


def _luma(like: torch.Tensor) -> torch.Tensor:
    """Greyscale weights (1, 3, 1, 1) filled on `like`'s device: a host copy breaks CUDA graph capture."""
    return torch.stack([like.new_full((), w) for w in _LUMA]).view(1, 3, 1, 1)


def _gray(images: torch.Tensor, luma: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) greyscale of (B, 3, H, W) images, as rgb_to_grayscale; a product and sum, not an einsum,
    which copies the images first (same bits on the CPU, a third of the operations)."""
    return (images * luma).sum(dim=1, keepdim=True)


def _triangle(k: torch.Tensor) -> torch.Tensor:
    """HSV-to-RGB's ramp clamp(min(k, 4 - k), 0, 1) of period 6 for k in [0, 12), both periods written out."""
    return torch.minimum(k, 4 - k).clamp_(0, 1).add_(torch.minimum(k - 6, 10 - k).clamp_(0, 1))


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's HSV hue by `shift` (n,) turns, as adjust_hue: value and chroma stay, so channel c
    becomes max - chroma * ramp((n_c + 6 h) mod 6), n = 5, 3, 1 for R, G, B, without torchvision's six stacked
    candidates. The hue h (in sixths) follows torchvision: the largest channel decides, red before green."""
    r, g, b = images.unbind(dim=1)
    high = torch.maximum(torch.maximum(r, g), b)
    chroma = high - torch.minimum(torch.minimum(r, g), b)
    red = (high == r).to(images.dtype)
    green = (high == g).to(images.dtype).mul_(1 - red)
    blue = 1 - red - green
    # Greys have chroma 0 and numerator 0; the floor on the divisor keeps them at hue 0, not NaN.
    sextant = (red * (g - b) + green * (b - r) + blue * (r - g)).div_(chroma.clamp(min=torch.finfo(chroma.dtype).tiny))
    sextant = sextant.add_(green * 2 + blue * 4).add_(6 * shift.view(-1, 1, 1)).remainder_(6)
    # All three channels broadcast over their offsets: the same bits, a third of the GPU operations.
    offsets = torch.arange(5, 0, -2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    ramp = _triangle(sextant.unsqueeze(1) + offsets)
    return torch.addcmul(high.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1)


def _blend_stage(images: torch.Tensor, step: torch.Tensor, factors: torch.Tensor, weights, luma) -> torch.Tensor:
    """Each image's brightness, contrast or saturation `step` (n,) with its (n, 3) `factors`: torchvision's
    _blend with black, the grey mean, or the greyscale image, clamped to [0, 1]."""
    factor = factors.gather(1, step.view(-1, 1)).view(-1, 1, 1, 1)
    gray = _gray(images, luma)
    if weights is None:
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    else:
        mean = (gray * weights).sum(dim=(1, 2, 3), keepdim=True) / weights.sum(dim=(1, 2, 3), keepdim=True)
    step = step.view(-1, 1, 1, 1)
    target = torch.where(step == SATURATION, gray, torch.where(step == CONTRAST, mean, torch.zeros_like(mean)))
    return torch.lerp(target.expand_as(images), images, factor).clamp_(0, 1)


def _jitter_by_stage(images, p: JitterParams, factors, weights, out, luma) -> None:
    """The batch stage by stage, hue shifts apart from blends, so the operation count does not grow with B."""
    x, start = images, 0
    for stage, count in enumerate(p.hue_counts):
        hue_rows = p.hue_rows[start:start + count]
        blend_rows = torch.cat([p.hue_rows[:start], p.hue_rows[start + count:]])
        start += count
        nxt = out if stage == JITTER_STEPS - 1 else torch.empty_like(images)
        if blend_rows.numel():  # a host-side size: hue_counts are host integers
            w = None if weights is None else weights.index_select(0, blend_rows)
            step = p.order.index_select(0, blend_rows)[:, stage]
            blended = _blend_stage(x.index_select(0, blend_rows), step, factors.index_select(0, blend_rows), w, luma)
            nxt.index_copy_(0, blend_rows, blended)
        if count:
            nxt.index_copy_(0, hue_rows, _shift_hue(x.index_select(0, hue_rows), p.hue.index_select(0, hue_rows)))
        x = nxt


def apply_jitter(images: torch.Tensor, p: JitterParams, weights=None, out=None) -> torch.Tensor:
    """torchvision's ColorJitter on each image (B, 3, H, W) in [0, 1] with its factors and order. `weights`
    (B, 1, H, W) of 0/1 restricts contrast's grey mean to the pixels marked 1 (the packed CutPaste patches).
    Writes to `out` (B, 3, H, W, any memory format) if given, else a new tensor; `images` is never changed."""
    out = torch.empty_like(images) if out is None else out
    factors = torch.stack([p.brightness, p.contrast, p.saturation], dim=1)
    _jitter_by_stage(images, p, factors, weights, out, _luma(images))
    return out


def max_patch_pixels(img_h: int, img_w: int) -> int:
    """Upper bound on any box's pixels at H x W, so patches are cut without reading sizes back: sides round(sqrt(A a))
    and round(sqrt(A / a)) give at most (sqrt(A a) + 1/2) (sqrt(A / a) + 1/2), largest at the extreme aspect a."""
    area = CUTPASTE_AREA_RATIO[1] * img_h * img_w
    spread = max(math.sqrt(a) + 1 / math.sqrt(a) for a in CUTPASTE_ASPECT_RATIO)
    cutpaste = math.floor(area + math.sqrt(area) * spread / 2 + 0.25)
    return min(img_h * img_w, max(cutpaste, SCAR_WIDTH[1] * SCAR_HEIGHT[1]))


def cut_patches(images: torch.Tensor, p: PasteParams):
    """Each source box packed row by row into K = max_patch_pixels(H, W) slots: pixels (B, 3, 1, K) and weights
    (B, 1, 1, K), 1 on the box, 0 on the padding, so jitter's contrast mean is the box's, as the earlier
    reimplementation's jitter of the cropped patch."""
    b, c, h, w = images.shape
    slot = torch.arange(max_patch_pixels(h, w), device=images.device, dtype=torch.float32).view(1, -1)
    width = p.width.view(-1, 1)
    row = torch.div(slot, width, rounding_mode="floor")
    top, left = (p.src_y - (p.height - 1) / 2).view(-1, 1), (p.src_x - (p.width - 1) / 2).view(-1, 1)
    index = ((top + row).clamp(max=h - 1) * w + left + slot - row * width).long()
    pixels = torch.gather(images.reshape(b, c, h * w), 2, index.unsqueeze(1).expand(b, c, -1))
    weights = (row < p.height.view(-1, 1)).to(images.dtype)
    return pixels.unsqueeze(2), weights.view(b, 1, 1, -1)


def paste_mask_and_slot(p: PasteParams, img_h: int, img_w: int):
    """The pixels the patch covers (B, H, W) bool, and the slot of cut_patches' packing each copies (B, H, W)
    long, by the inverse rotation about the patch centre (with angle 0 an exact integer shift)."""
    dev = p.src_y.device
    ys = torch.arange(img_h, device=dev, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(img_w, device=dev, dtype=torch.float32).view(1, 1, -1)
    height, width = p.height.view(-1, 1, 1), p.width.view(-1, 1, 1)
    rel_y, rel_x = ys - p.dst_y.view(-1, 1, 1), xs - p.dst_x.view(-1, 1, 1)
    cos, sin = torch.cos(p.angle).view(-1, 1, 1), torch.sin(p.angle).view(-1, 1, 1)
    u = cos * rel_x + sin * rel_y  # patch-frame coordinates (inverse rotation)
    v = -sin * rel_x + cos * rel_y
    inside = (u.abs() < width / 2) & (v.abs() < height / 2)
    # Clamped so that a rounding error at a rotated edge cannot read the packing's padding.
    row = torch.floor(v + height / 2).clamp_(min=0).minimum(height - 1)
    col = torch.floor(u + width / 2).clamp_(min=0).minimum(width - 1)
    return inside, (row * width + col).long()


def apply_paste(images: torch.Tensor, patches: torch.Tensor, p: PasteParams, out=None) -> torch.Tensor:
    """Paste `patches` (B, 3, 1, K), as cut_patches packs them, onto a copy of `images` (B, 3, H, W) or `out`."""
    b, c, h, w = images.shape
    inside, slot = paste_mask_and_slot(p, h, w)
    slot = slot.view(b, 1, h * w).expand(b, c, h * w)
    patch = torch.gather(patches.reshape(b, c, -1), 2, slot).view(b, c, h, w)
    return torch.where(inside.unsqueeze(1), patch, images, out=out)


def _select(mask: torch.Tensor, a: PasteParams, b: PasteParams) -> PasteParams:
    return PasteParams(*(torch.where(mask, getattr(a, f), getattr(b, f)) for f in PasteParams.__dataclass_fields__))


def cutpaste_views(images: torch.Tensor, kind: str, gen: torch.Generator, out=None) -> torch.Tensor:
    """One view per image: 'cutpaste', 'scar' or 'union' (either, p = 0.5); the patch, from the same image, gets
    its own colour jitter (section 3.1), computed on the cut patch alone as the earlier reimplementation did."""
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
    patches, weights = cut_patches(images, params)
    return apply_paste(images, apply_jitter(patches, sample_jitter(n, gen), weights), params, out)


def sample_indices(n: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Which of `n` training images fill a batch: distinct ones when there are enough, else with replacement."""
    if batch_size <= n:
        return torch.randperm(n, generator=gen, device=gen.device)[:batch_size]
    return torch.randint(n, (batch_size,), generator=gen, device=gen.device)


def augment_batch(base: torch.Tensor, variant: str, gen: torch.Generator):
    """The variant's batch from clean `base` (B, 3, H, W) in [0, 1]: x (k * B, 3, H, W), labels (k * B,) long for
    k classes: clean (0), CutPaste or union (1), scar (2 in 3-way, 1 in scar). The whole image is jittered first,
    as the earlier reimplementation did; boxes fit H x W, so with patches (section 2.4) they stay inside each."""
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    b = base.shape[0]
    kinds = {"normal": ["cutpaste"], "scar": ["scar"], "union": ["union"], "3way": ["cutpaste", "scar"]}[variant]
    x = base.new_empty((b * (1 + len(kinds)),) + tuple(base.shape[1:]))
    clean = apply_jitter(base, sample_jitter(b, gen), out=x[:b])
    for view, kind in enumerate(kinds, start=1):
        cutpaste_views(clean, kind, gen, out=x[view * b:(view + 1) * b])
    # Expanded, not repeat_interleave'd: no read back to the host, which cudagraphs.py cannot capture.
    labels = torch.arange(1 + len(kinds), device=base.device).view(-1, 1).expand(-1, b).reshape(-1)
    return x, labels


def make_batch(images_u8: torch.Tensor, variant: str, batch_size: int, gen: torch.Generator):
    """augment_batch of `batch_size` images sampled from images_u8 (N, 3, H, W) uint8 on the generator's device:
    x (k * batch_size, 3, H, W) float in [0, 1] and labels (k * batch_size,) long."""
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    idx = sample_indices(images_u8.shape[0], batch_size, gen)
    return augment_batch(images_u8[idx].float().div_(255), variant, gen)
