"""Evaluation figures, written to files without a display (matplotlib Figure objects, no pyplot state)."""
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn.manifold import TSNE
from sklearn.metrics import roc_curve

# t-SNE's default perplexity; lowered for tiny sets, where it must stay below the sample count.
TSNE_PERPLEXITY = 30.0


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_roc(labels: np.ndarray, scores: np.ndarray, auroc: float, title: str, path: Path) -> Path:
    """Image-level ROC curve with its AUROC."""
    fpr, tpr, _ = roc_curve(labels, scores)
    ax = Figure(figsize=(4.5, 4.5)).subplots()
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {auroc:.3f}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right")
    return _save(ax.figure, path)


def plot_score_hist(scores: np.ndarray, defects: list[str], title: str, path: Path) -> Path:
    """Anomaly-score histograms: good test images against each defect type."""
    frame = pd.DataFrame({"score": scores, "type": defects})
    ax = Figure(figsize=(6, 4)).subplots()
    bins = min(30, max(5, len(scores) // 3))
    sns.histplot(frame, x="score", hue="type", hue_order=sorted(set(defects), key=lambda d: (d != "good", d)),
                 bins=bins, element="step", stat="count", common_norm=False, ax=ax)
    ax.set(title=title, xlabel="anomaly score (Mahalanobis distance)")
    return _save(ax.figure, path)


def plot_tsne(embeds: np.ndarray, groups: list[str], title: str, path: Path, seed: int = 0) -> Path:
    """2-D t-SNE of embeddings coloured by group (train, good, each defect type)."""
    perplexity = min(TSNE_PERPLEXITY, max(1.0, (embeds.shape[0] - 1) / 3))
    coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(embeds)
    frame = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "group": groups})
    ax = Figure(figsize=(5.5, 4.5)).subplots()
    sns.scatterplot(frame, x="x", y="y", hue="group", s=18, ax=ax)
    ax.set(title=title, xticks=[], yticks=[], xlabel="", ylabel="")
    return _save(ax.figure, path)


def plot_heatmap(image: np.ndarray, mask: np.ndarray | None, heatmap: np.ndarray, vmin: float, vmax: float,
                 title: str, path: Path) -> Path:
    """Image (H, W, 3) uint8, mask (H, W) bool or None, and heatmap (H, W) on the category's scale [vmin, vmax]."""
    fig = Figure(figsize=(9, 3.3))
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    axes[1].imshow(np.zeros(image.shape[:2]) if mask is None else mask, cmap="gray", vmin=0, vmax=1,
                   interpolation="nearest")
    axes[2].imshow(image)
    shown = axes[2].imshow(heatmap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    if mask is not None and mask.any():
        axes[2].contour(mask, levels=[0.5], colors="white", linewidths=0.8)
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.04)
    for ax, name in zip(axes, (title, "no mask" if mask is None else "ground truth", "anomaly map")):
        ax.set(xticks=[], yticks=[])
        ax.set_title(name, fontsize=9)
    return _save(fig, path)
