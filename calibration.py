"""Decision thresholds from the clean training images: what "anomalous" means in predict.py.

A checkpoint's density is fitted on the clean training embeddings, so those images' own scores
(`train_scores`) are in-sample and run low: a threshold taken from them flags too many new clean
images. Training therefore also stores `heldout_scores`: every clean training image scored by a
Gaussian fitted without it (k-fold). The threshold for a quantile q is the q-quantile of those
scores, so a new clean image like the training ones lands above it with probability about 1 - q
(the expected false-alarm rate); defective images are flagged insofar as they score higher.

Nothing here runs at import time.
"""
import torch

import engine

# Folds of the held-out scoring: each fit sees 80 % of the clean images.
HELDOUT_FOLDS = 5
# Default quantile of the held-out clean scores used as threshold: about 1 % false alarms on clean images.
DEFAULT_QUANTILE = 0.99


def heldout_scores(train_embeds: torch.Tensor, kind: str = "torch", folds: int = HELDOUT_FOLDS) -> torch.Tensor:
    """(N, D) clean embeddings -> (N,) scores, image i scored by a density fitted without fold i % folds.

    The folds interleave the (sorted) images, and no random numbers are drawn. Returns an empty
    tensor when there are too few images to leave any out (fewer than 3).
    """
    n = train_embeds.shape[0]
    folds = min(folds, n)
    if n < 3 or folds < 2:
        return torch.empty(0)
    fold = torch.arange(n, device=train_embeds.device) % folds
    scores = torch.empty(n)
    for f in range(folds):
        held = fold == f
        _, s = engine.fit_and_score(train_embeds[~held], train_embeds[held], kind)
        scores[held.cpu()] = s.float().cpu()
    return scores


def quantile_threshold(scores: torch.Tensor, quantile: float) -> float:
    """The `quantile` (in [0, 1]) of `scores`, linearly interpolated between order statistics."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile {quantile} is outside [0, 1]")
    return float(torch.quantile(scores.double(), quantile))
