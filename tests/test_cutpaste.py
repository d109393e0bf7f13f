import math

import pytest
import torch

import cutpaste as cp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("h,w", [(64, 64), (48, 96)])
def test_cutpaste_boxes_inside_and_ratios(h, w):
    p = cp.sample_cutpaste(4000, h, w, gen())
    for cy, cx in ((p.src_y, p.src_x), (p.dst_y, p.dst_x)):
        top, left = cy - (p.height - 1) / 2, cx - (p.width - 1) / 2
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + p.height <= h).all() and (left + p.width <= w).all()
        assert torch.equal(top, top.round()) and torch.equal(left, left.round())
    area = p.height * p.width / (h * w)
    # Rounding the sides to whole pixels moves the ratio a little beyond the paper's bounds.
    assert area.min() > 0.015 and area.max() < 0.17
    assert abs(area.mean().item() - sum(cp.CUTPASTE_AREA_RATIO) / 2) < 0.01
    log_aspect = torch.log(p.width / p.height)
    assert log_aspect.min() > math.log(0.3) - 0.2 and log_aspect.max() < math.log(1 / 0.3) + 0.2
    assert abs(log_aspect.mean().item()) < 0.05, "log-uniform aspect is symmetric around 1"


def test_scar_sizes_and_angles():
    p = cp.sample_scar(4000, 64, 64, gen())
    assert p.width.min() == 2 and p.width.max() == 16
    assert p.height.min() == 10 and p.height.max() == 25
    deg = torch.rad2deg(p.angle)
    assert deg.min() >= -45 and deg.max() <= 45 and deg.min() < -40 and deg.max() > 40


def test_paste_changes_only_the_region_and_copies_the_source():
    images = torch.rand(64, 3, 40, 56, generator=gen(1))
    for params in (cp.sample_cutpaste(64, 40, 56, gen(2)), cp.sample_scar(64, 40, 56, gen(3))):
        before = images.clone()
        out = cp.apply_paste(images, images, params)
        assert torch.equal(images, before), "input untouched"
        inside, index = cp.paste_mask_and_source(params, 40, 56)
        changed = (out != images).any(dim=1)
        assert not (changed & ~inside).any(), "pixels outside the patch are unchanged"
        flat = images.flatten(2)
        expect = torch.gather(flat, 2, index.flatten(1).unsqueeze(1).expand(-1, 3, -1)).view_as(images)
        assert torch.equal(out[inside.unsqueeze(1).expand_as(out)], expect[inside.unsqueeze(1).expand_as(out)])


def test_axis_parallel_patch_is_an_exact_shifted_copy():
    images = torch.rand(32, 3, 50, 70, generator=gen(4))
    p = cp.sample_cutpaste(32, 50, 70, gen(5))
    out = cp.apply_paste(images, images, p)
    for i in range(32):
        h, w = int(p.height[i]), int(p.width[i])
        sy, sx = int(p.src_y[i] - (h - 1) / 2), int(p.src_x[i] - (w - 1) / 2)
        dy, dx = int(p.dst_y[i] - (h - 1) / 2), int(p.dst_x[i] - (w - 1) / 2)
        assert torch.equal(out[i, :, dy:dy + h, dx:dx + w], images[i, :, sy:sy + h, sx:sx + w])
        inside, _ = cp.paste_mask_and_source(cp.PasteParams(*(getattr(p, f)[i:i + 1] for f in
                                                              cp.PasteParams.__dataclass_fields__)), 50, 70)
        assert int(inside.sum()) == h * w


def test_rotated_scar_area_matches_its_box():
    p = cp.sample_scar(500, 96, 96, gen(6))
    inside, _ = cp.paste_mask_and_source(p, 96, 96)
    ratio = inside.flatten(1).sum(1) / (p.width * p.height)
    assert (ratio - 1).abs().mean() < 0.1
    assert (inside.flatten(1).sum(1) > 0).all()


def test_jitter_bounds_identity_and_purity():
    images = torch.rand(8, 3, 16, 16, generator=gen(7))
    ones = torch.ones(8)
    ident = cp.JitterParams(ones, ones, ones, torch.zeros(8))
    assert torch.allclose(cp.apply_jitter(images, ident), images, atol=1e-5)
    p = cp.sample_jitter(1000, gen(8))
    assert p.brightness.min() >= 0.9 and p.brightness.max() <= 1.1
    assert p.hue.min() >= -0.1 and p.hue.max() <= 0.1
    before = images.clone()
    out = cp.apply_jitter(images, cp.sample_jitter(8, gen(9)))
    assert torch.equal(images, before) and out.min() >= 0 and out.max() <= 1
    gray = torch.full((1, 3, 4, 4), 0.5)
    hue_only = cp.JitterParams(torch.ones(1), torch.ones(1), torch.ones(1), torch.tensor([0.1]))
    assert torch.allclose(cp.apply_jitter(gray, hue_only), gray, atol=1e-5), "hue leaves greys alone"


@pytest.mark.parametrize("variant,k", [("normal", 2), ("scar", 2), ("union", 2), ("3way", 3)])
def test_make_batch_shapes_labels_and_seed(variant, k):
    images = (torch.rand(20, 3, 32, 48, generator=gen(10)) * 255).to(torch.uint8)
    before = images.clone()
    x1, y1 = cp.make_batch(images, variant, 6, gen(11))
    x2, y2 = cp.make_batch(images, variant, 6, gen(11))
    x3, _ = cp.make_batch(images, variant, 6, gen(12))
    assert x1.shape == (6 * k, 3, 32, 48) and torch.equal(y1, torch.arange(k).repeat_interleave(6))
    assert torch.equal(x1, x2) and torch.equal(y1, y2), "same seed, same batch"
    assert not torch.equal(x1, x3)
    assert torch.equal(images, before)
    # Every augmented view differs from its clean view somewhere, and only in a small region.
    clean = x1[:6]
    for view in range(1, k):
        diff = (x1[6 * view:6 * (view + 1)] != clean).any(dim=1).flatten(1).float().mean(1)
        assert (diff > 0).all() and (diff < 0.3).all()


def test_batch_larger_than_dataset_and_bad_variant():
    images = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    x, _ = cp.make_batch(images, "normal", 8, gen())
    assert x.shape[0] == 16
    with pytest.raises(ValueError, match="unknown variant"):
        cp.make_batch(images, "mixup", 2, gen())


def test_fused_jitter_matches_torchvision_where_nothing_clips():
    from torchvision.transforms.v2 import functional as TF
    images = 0.35 + 0.3 * torch.rand(4, 3, 12, 10, generator=gen(13))
    p = cp.sample_jitter(4, gen(14))
    p = cp.JitterParams(p.brightness, p.contrast, p.saturation, torch.zeros(4))
    ours = cp.apply_jitter(images, p)
    for i in range(4):
        ref = TF.adjust_brightness(images[i], p.brightness[i].item())
        ref = TF.adjust_contrast(ref, p.contrast[i].item())
        ref = TF.adjust_saturation(ref, p.saturation[i].item())
        assert torch.allclose(ours[i], ref, atol=1e-5)
