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


def test_paste_changes_only_the_region_and_copies_the_source_box():
    images = torch.rand(64, 3, 40, 56, generator=gen(1))
    for params in (cp.sample_cutpaste(64, 40, 56, gen(2)), cp.sample_scar(64, 40, 56, gen(3))):
        before = images.clone()
        patches, weights = cp.cut_patches(images, params)
        out = cp.apply_paste(images, patches, params)
        assert torch.equal(images, before), "input untouched"
        inside, slot = cp.paste_mask_and_slot(params, 40, 56)
        changed = (out != images).any(dim=1)
        assert not (changed & ~inside).any(), "pixels outside the patch are unchanged"
        # Every pasted pixel reads a slot of the box itself, never the packing's padding.
        assert bool((torch.gather(weights.flatten(1), 1, slot.flatten(1))[inside.flatten(1)] == 1).all())
        for i in range(0, 64, 7):
            top = int(params.src_y[i] - (params.height[i] - 1) / 2)
            left = int(params.src_x[i] - (params.width[i] - 1) / 2)
            box = images[i, :, top:top + int(params.height[i]), left:left + int(params.width[i])]
            assert torch.equal(patches[i, :, 0, :box[0].numel()], box.flatten(1))
            assert int(weights[i].sum()) == box[0].numel()


def test_patch_packing_bound_holds():
    for h, w in ((256, 256), (64, 64), (48, 96), (16, 16)):
        bound = cp.max_patch_pixels(h, w)
        for params in (cp.sample_cutpaste(20000, h, w, gen(20)), cp.sample_scar(2000, h, w, gen(21))):
            assert int((params.height * params.width).max()) <= bound
    areas = cp.sample_cutpaste(20000, 256, 256, gen(22))
    assert int((areas.height * areas.width).max()) > 0.95 * cp.max_patch_pixels(256, 256), "the bound is close"


def test_axis_parallel_patch_is_an_exact_shifted_copy():
    images = torch.rand(32, 3, 50, 70, generator=gen(4))
    p = cp.sample_cutpaste(32, 50, 70, gen(5))
    out = cp.apply_paste(images, cp.cut_patches(images, p)[0], p)
    for i in range(32):
        h, w = int(p.height[i]), int(p.width[i])
        sy, sx = int(p.src_y[i] - (h - 1) / 2), int(p.src_x[i] - (w - 1) / 2)
        dy, dx = int(p.dst_y[i] - (h - 1) / 2), int(p.dst_x[i] - (w - 1) / 2)
        assert torch.equal(out[i, :, dy:dy + h, dx:dx + w], images[i, :, sy:sy + h, sx:sx + w])
        inside, _ = cp.paste_mask_and_slot(cp.PasteParams(*(getattr(p, f)[i:i + 1] for f in
                                                            cp.PasteParams.__dataclass_fields__)), 50, 70)
        assert int(inside.sum()) == h * w


def test_rotated_scar_area_matches_its_box():
    p = cp.sample_scar(500, 96, 96, gen(6))
    inside, _ = cp.paste_mask_and_slot(p, 96, 96)
    ratio = inside.flatten(1).sum(1) / (p.width * p.height)
    assert (ratio - 1).abs().mean() < 0.1
    assert (inside.flatten(1).sum(1) > 0).all()


def test_jitter_bounds_identity_and_purity():
    images = torch.rand(8, 3, 16, 16, generator=gen(7))
    ones = torch.ones(8)
    ident = cp.jitter_params(ones, ones, ones, torch.zeros(8))
    assert torch.allclose(cp.apply_jitter(images, ident), images, atol=1e-5)
    p = cp.sample_jitter(1000, gen(8))
    assert p.brightness.min() >= 0.9 and p.brightness.max() <= 1.1
    assert p.hue.min() >= -0.1 and p.hue.max() <= 0.1
    before = images.clone()
    out = cp.apply_jitter(images, cp.sample_jitter(8, gen(9)))
    assert torch.equal(images, before) and out.min() >= 0 and out.max() <= 1
    gray = torch.full((1, 3, 4, 4), 0.5)
    hue_only = cp.jitter_params(torch.ones(1), torch.ones(1), torch.ones(1), torch.tensor([0.1]))
    assert torch.allclose(cp.apply_jitter(gray, hue_only), gray, atol=1e-5), "hue leaves greys alone"


def test_jitter_orders_are_uniform_and_hue_stages_match_the_order():
    n = 4800
    p = cp.sample_jitter(n, gen(15))
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4)), "each row is a permutation"
    hue_stage = (p.order == cp.HUE).long().argmax(dim=1)
    assert torch.equal(hue_stage[p.hue_rows], torch.arange(n) * 4 // n), "hue_rows is sorted by hue stage"
    assert p.hue_counts == (n // 4,) * 4
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(dim=1)
    freq = torch.bincount(codes, minlength=256)[torch.unique(codes)].float() / n
    assert len(freq) == 24 and (freq - 1 / 24).abs().max() < 0.015, "all 24 orders, equally often"
    # Same seed, same parameters; the explicit constructor agrees with the sampled grouping.
    q = cp.sample_jitter(n, gen(15))
    assert torch.equal(p.order, q.order) and torch.equal(p.hue, q.hue)
    r = cp.jitter_params(p.brightness, p.contrast, p.saturation, p.hue, p.order)
    assert r.hue_counts == p.hue_counts and torch.equal(hue_stage[r.hue_rows], hue_stage[p.hue_rows])


def test_jitter_matches_torchvision_colorjitter_image_by_image():
    """Each image gets torchvision's four steps in its own order, clamps included, hue in HSV."""
    images = torch.rand(24, 3, 12, 10, generator=gen(13))
    images[:4] = 0.95 + 0.05 * images[:4]  # brightness pushes these past 1, so the clamps matter
    p = cp.sample_jitter(24, gen(14))
    ours = cp.apply_jitter(images, p)
    for i in range(24):
        assert torch.allclose(ours[i], cp.color_jitter(images[i], p, i), atol=2e-5), i


def test_patch_jitter_uses_the_patch_alone():
    """The jitter of a packed patch equals torchvision's on the cropped box (contrast's mean included)."""
    images = torch.rand(12, 3, 30, 40, generator=gen(16))
    params = cp.sample_cutpaste(12, 30, 40, gen(17))
    patches, weights = cp.cut_patches(images, params)
    p = cp.sample_jitter(12, gen(18))
    p = cp.jitter_params(torch.ones(12), 0.5 + torch.rand(12, generator=gen(19)), p.saturation, p.hue, p.order)
    jittered = cp.apply_jitter(patches, p, weights)
    for i in range(12):
        h, w = int(params.height[i]), int(params.width[i])
        top, left = int(params.src_y[i] - (h - 1) / 2), int(params.src_x[i] - (w - 1) / 2)
        expect = cp.color_jitter(images[i, :, top:top + h, left:left + w], p, i)
        assert torch.allclose(jittered[i, :, 0, :h * w], expect.flatten(1), atol=2e-5), i


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


def test_hue_shift_matches_torchvision_on_greys_ties_and_large_shifts():
    from torchvision.transforms.v2 import functional as TF
    images = torch.rand(40, 3, 9, 9, generator=gen(23))
    images[:8] = images[:8].round()  # pure and saturated colours
    images[8:16, 1] = images[8:16, 0]  # red and green tie for the largest channel
    images[16:20] = 0.3  # grey: no hue at all
    shift = torch.rand(40, generator=gen(24)) - 0.5  # torchvision allows hue factors in [-0.5, 0.5]
    hue_only = cp.jitter_params(torch.ones(40), torch.ones(40), torch.ones(40), shift)
    ours = cp.apply_jitter(images, hue_only)
    for i in range(40):
        assert torch.allclose(ours[i], TF.adjust_hue(images[i], shift[i].item()), atol=1e-5), i


@pytest.mark.parametrize("kind,sample", [("cutpaste", cp.sample_cutpaste), ("scar", cp.sample_scar)])
def test_batched_views_equal_the_method_image_by_image(kind, sample):
    """The batched path (packed slots, staged jitter) gives what cut_box, color_jitter and paste_box give one image
    at a time, on the parameters the same generator draws: rotated scars and torchvision's clamps included."""
    images = torch.rand(16, 3, 40, 56, generator=gen(25))
    images[:4] = 0.95 + 0.05 * images[:4]  # brightness pushes these past 1, so the clamps matter
    batched = cp.cutpaste_views(images, kind, gen(26))
    g = gen(26)
    params, jitter = sample(16, 40, 56, g), cp.sample_jitter(16, g)
    for i in range(16):
        one = cp.cutpaste_image(images[i], params, jitter, i)
        assert (one != images[i]).any(dim=0).sum() > 0, "the reference pastes something"
        assert torch.allclose(batched[i], one, atol=2e-5), i


@pytest.mark.parametrize("variant", ["3way", "union"])
def test_augment_batch_equals_the_method_image_by_image(variant):
    """augment_batch's draws, in its order: the clean images' jitter, then per view its boxes (union: a coin per
    image, then CutPaste's and the scar's boxes) and the patches' jitter; each view applied to the jittered clean
    image, one image at a time."""
    base = torch.rand(12, 3, 48, 40, generator=gen(27))
    x, _ = cp.augment_batch(base, variant, gen(28))
    g = gen(28)
    clean_jitter = cp.sample_jitter(12, g)
    clean = [cp.color_jitter(base[i], clean_jitter, i) for i in range(12)]
    views = [torch.stack(clean)]
    for kind in (["cutpaste", "scar"] if variant == "3way" else ["union"]):
        if kind == "union":
            coin = torch.rand(12, generator=g) < 0.5
            both = cp.sample_cutpaste(12, 48, 40, g), cp.sample_scar(12, 48, 40, g)
            boxes = [both[0] if coin[i] else both[1] for i in range(12)]
        else:
            boxes = [{"cutpaste": cp.sample_cutpaste, "scar": cp.sample_scar}[kind](12, 48, 40, g)] * 12
        jitter = cp.sample_jitter(12, g)
        views.append(torch.stack([cp.cutpaste_image(clean[i], boxes[i], jitter, i) for i in range(12)]))
    assert torch.allclose(x, torch.cat(views), atol=2e-5)
