"""Pixel AUROC and PRO against values worked out by hand, and PRO against its definition."""
import numpy as np
import pytest

from evaluation import metrics


def test_pixel_auroc_by_hand():
    # 4 defective pixels with scores 9, 8, 5, 2 and 4 defect-free ones with 7, 3, 1, 0: of the 16
    # (defective, defect-free) pairs, 13 are ordered right (9 and 8 beat all 4; 5 beats 3; 2 beats 1).
    masks = np.array([[[1, 1, 0, 0], [1, 1, 0, 0]]], dtype=bool)
    maps = np.array([[[9, 8, 7, 3], [5, 2, 1, 0]]], dtype=float)
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(13 / 16)
    assert np.isnan(metrics.pixel_auroc(np.zeros((1, 2, 2), bool), np.ones((1, 2, 2))))


def test_pro_curve_by_hand():
    # Image 0: region A = 2 px (scores 9, 4); image 1: region B = 1 px (score 6).
    # The 7 defect-free pixels score 8, 1, 0 (image 0) and 5, 3, 2, 0.5 (image 1).
    masks = np.zeros((2, 1, 5), dtype=bool)
    masks[0, 0, :2] = True
    masks[1, 0, 0] = True
    maps = np.array([[[9, 4, 8, 1, 0]], [[6, 5, 3, 2, 0.5]]], dtype=float)
    fpr, pro = metrics.pro_curve(masks, maps)
    # Lowering the threshold through 9, 8, 6, 5, 4, 3, 2, 1, 0.5, 0: PRO = mean(overlap A, overlap B)
    # goes 0.25 (half of A), 0.75 (+ all of B), 1 (all of A); FPR counts the defect-free pixels passed.
    np.testing.assert_allclose(fpr, np.array([0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 7]) / 7)
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 0.75, 1, 1, 1, 1, 1, 1, 1])
    # Area up to FPR 0.3: 0.25 on [0, 1/7], 0.75 on [1/7, 2/7], 1 on [2/7, 0.3]; divided by 0.3.
    area = 0.25 / 7 + 0.75 / 7 + (0.3 - 2 / 7)
    assert metrics.pro_score(masks, maps) == pytest.approx(area / 0.3)
    assert metrics.pro_score(masks, maps) == pytest.approx(0.5238095, abs=1e-6)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), dtype=bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 10:12, 10:15] = True
    masks[2, 7:9, 7:9] = True
    perfect = masks + 0.01 * rng.random(masks.shape)
    assert metrics.pixel_auroc(masks, perfect) == 1.0
    assert metrics.pro_score(masks, perfect) == pytest.approx(1.0)
    assert metrics.pro_score(masks, -perfect) == pytest.approx(0.0)


def _pro_by_definition(masks, maps, max_fpr, thresholds):
    """PRO straight from Bergmann et al.'s definition: loop over thresholds and regions."""
    from scipy import ndimage
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for t in thresholds:
        pred = maps >= t
        fpr = (pred & ~masks).sum() / (~masks).sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    x, y = map(np.array, zip(*sorted(points)))
    return metrics.area_up_to(x, y, max_fpr) / max_fpr


def test_pro_matches_its_definition_on_random_maps():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 12, 12), dtype=bool)
    masks[0, 1:4, 1:5] = True
    masks[0, 8:11, 6:7] = True  # a second region in the same image
    masks[1, 5:9, 5:9] = True
    masks[1, 4, 4] = True  # diagonal neighbour: 8-connected to the square, one region
    maps = rng.random(masks.shape) + 0.6 * masks
    thresholds = np.unique(maps)[::-1]
    assert metrics.pro_score(masks, maps) == pytest.approx(_pro_by_definition(masks, maps, 0.3, thresholds))
