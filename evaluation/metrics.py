"""Localization metrics of masks (N, H, W) bool (True = defective) and maps (N, H, W) float (larger = more
anomalous), numpy or torch: pixel AUROC over all pixels pooled (Li et al., CVPR 2021, section 4.2, Table 2), and
PRO (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021, section 4.2.2): the mean overlap of the
ground-truth components against the FPR of the defect-free pixels, its area up to FPR 0.3 divided by 0.3."""
import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

# Bergmann et al. (IJCV 2021) integrate the PRO curve up to a false-positive rate of 30 %.
PRO_MAX_FPR = 0.3
# Components are 8-connected, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _numpy(array) -> np.ndarray:
    return array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images (defective = positive); NaN when only one class is present."""
    return image_auroc(_numpy(masks).astype(bool), maps)


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from (0, 0) to (1, 1): as each pixel passes the threshold it adds
    1 / #defect-free to the FPR or 1 / (component size * #components) to PRO, so two cumsums give the curve."""
    masks, maps = _numpy(masks).astype(bool), _numpy(maps).astype(np.float64)
    fp_step = (~masks).astype(np.float64)
    pro_step = np.zeros(masks.shape, dtype=np.float64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count:
            sizes = np.bincount(labelled.ravel())
            pro_step[i][mask] = 1.0 / sizes[labelled[mask]]
            regions += count
    negatives = fp_step.sum()
    if regions == 0 or negatives == 0:
        raise ValueError("PRO needs at least one defective region and one defect-free pixel")
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr, pro = np.cumsum(fp_step.ravel()[order]) / negatives, np.cumsum(pro_step.ravel()[order]) / regions
    # Pixels with equal scores switch together: keep the last point of each run of ties.
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    fpr, pro = np.minimum(fpr[last_of_tie], 1.0), np.minimum(pro[last_of_tie], 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the piecewise-linear curve (x, y) for x in [x[0], x_max] (x non-decreasing)."""
    keep = x <= x_max
    xs, ys = x[keep], y[keep]
    if xs[-1] < x_max and keep.sum() < len(x):
        nxt = int(keep.sum())  # first point beyond x_max: interpolate the curve at x_max
        frac = (x_max - xs[-1]) / (x[nxt] - xs[-1])
        xs, ys = np.append(xs, x_max), np.append(ys, ys[-1] + frac * (y[nxt] - ys[-1]))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2))


def pro_score(masks, maps, max_fpr: float = PRO_MAX_FPR) -> float:
    """Normalised area under the PRO curve up to `max_fpr` (1 is perfect); NaN without any defect region."""
    masks = _numpy(masks).astype(bool)
    if not masks.any() or masks.all():
        return float("nan")
    fpr, pro = pro_curve(masks, maps)
    return area_up_to(fpr, pro, max_fpr) / max_fpr


def image_auroc(labels, scores) -> float:
    """Image-level ROC AUC (defective = positive); NaN when only one class is present."""
    labels = _numpy(labels).ravel()
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, _numpy(scores).astype(np.float64).ravel()))
