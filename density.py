"""Gaussian density estimators on embeddings (Li et al., CVPR 2021, section 3.3).

The score of embedding f is sqrt((f - mu)^T Sigma^-1 (f - mu)) under the Gaussian of the clean training
embeddings, Sigma the Ledoit-Wolf estimate (Ledoit & Wolf, "A well-conditioned estimator for large-dimensional
covariance matrices", J. Multivariate Analysis 2004), invertible with fewer images than dimensions. Embeddings
are L2-normalised first, as the paper's code does. Also: held-out scores (predict.py's thresholds), ensemble
standardisation, and the patch Gaussians of localization (section 4.2, appendix A.5).
"""
import torch
import torch.nn.functional as F

from common.errors import CutPasteError

# Folds of the held-out scoring: each fit sees 80 % of the clean images.
HELDOUT_FOLDS = 5


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row of (N, D) embeddings."""
    return F.normalize(embeds.float(), p=2, dim=1)


def no_spread_message(n: int) -> str:
    return (f"cannot fit a Gaussian to {n} clean embedding(s) without any spread (a single training image, or "
            f"identical ones); add more, different clean images to train/good")


def float64_device(device: torch.device) -> torch.device:
    """Where float64 work for tensors on `device` runs: there, but on the CPU for MPS, which has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf covariance (D, D) of (N, D) samples and shrinkage s in [0, 1]: (1 - s) S + s * mu I, S empirical,
    mu = tr(S) / D, s = min(beta, delta) / delta as in Ledoit & Wolf (2004), lemmas 3.2-3.4."""
    n, d = x.shape
    xc = (x - x.mean(dim=0)).double()
    emp = xc.T @ xc / n
    mu = torch.trace(emp) / d
    # Identical rows have no spread: the shrinkage target mu * I is then zero too, and no shrinkage helps.
    if not bool((x != x[:1]).any()):
        raise CutPasteError(no_spread_message(n))
    sq = xc * xc
    beta_sum = (sq.T @ sq).sum() / n  # sum_k ||x_k x_k^T||_F^2 / n
    delta_sum = (emp * emp).sum()  # ||S||_F^2
    beta = (beta_sum - delta_sum) / (d * n)
    delta = (delta_sum - 2 * mu * torch.trace(emp) + d * mu * mu) / d
    shrinkage = 0.0 if delta == 0 else float(torch.clamp(beta, max=delta) / delta)
    cov = (1 - shrinkage) * emp + shrinkage * mu * torch.eye(d, dtype=emp.dtype, device=emp.device)
    return cov, shrinkage


def squared_mahalanobis(embeds: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(f - mu)^T Sigma^-1 (f - mu) of embeddings (..., M, D) under mean (..., 1, D) or (D,) and precision
    (..., D, D) -> (..., M): one Gaussian per leading index. The one Mahalanobis of the project, in matmuls that
    every exporter takes."""
    diff = embeds - mean
    return ((diff @ precision) * diff).sum(dim=-1)


def mahalanobis(embeds: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """The anomaly score of section 3.3: the square root of squared_mahalanobis, clamped at 0 against rounding."""
    return squared_mahalanobis(embeds, mean, precision).clamp(min=0).sqrt()


class GaussianDensityTorch:
    """Mean + Ledoit-Wolf precision, computed with torch on the embeddings' own device."""

    name = "torch"

    def fit(self, embeds: torch.Tensor) -> "GaussianDensityTorch":
        """embeds: (N, D) clean training embeddings (L2-normalised). The covariance and its inverse are computed in
        float64, on the CPU for a device without float64 (Apple's MPS), then the precision moves to the device."""
        self.mean = embeds.float().mean(dim=0)
        where = float64_device(embeds.device)
        cov, self.shrinkage = ledoit_wolf(embeds.float().to(where))
        self.precision = torch.linalg.inv(cov).float().to(embeds.device)
        return self

    def score(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) Mahalanobis distances; larger is more anomalous."""
        return mahalanobis(embeds.float(), self.mean, self.precision)

    def state_dict(self) -> dict:
        return {"kind": self.name, "mean": self.mean.cpu(), "precision": self.precision.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str | None = None) -> "GaussianDensityTorch":
        density = cls()
        density.mean = state["mean"].float().to(device)
        density.precision = state["precision"].float().to(device)
        return density


class GaussianDensitySklearn:
    """The same Gaussian through scikit-learn's LedoitWolf estimator (on the CPU)."""

    name = "sklearn"

    def fit(self, embeds: torch.Tensor) -> "GaussianDensitySklearn":
        if not bool((embeds != embeds[:1]).any()):
            raise CutPasteError(no_spread_message(len(embeds)))
        from sklearn.covariance import LedoitWolf  # loads scikit-learn's estimators only for --density sklearn
        self.model = LedoitWolf().fit(embeds.detach().cpu().double().numpy())
        return self

    def score(self, embeds: torch.Tensor) -> torch.Tensor:
        state = self.state_dict()
        return mahalanobis(embeds.detach().float().cpu(), state["mean"], state["precision"])

    def state_dict(self) -> dict:
        return {"kind": self.name, "mean": torch.from_numpy(self.model.location_).float(),
                "precision": torch.from_numpy(self.model.precision_).float()}


DENSITIES = {"torch": GaussianDensityTorch, "sklearn": GaussianDensitySklearn}


def make_density(name: str):
    if name not in DENSITIES:
        raise ValueError(f"unknown density {name!r}; choose one of {', '.join(DENSITIES)}")
    return DENSITIES[name]()


def fit_and_score(train_embeds: torch.Tensor, test_embeds: torch.Tensor, kind: str = "torch"):
    """Fit the Gaussian on normalised clean training embeddings; return (density, test scores (N,))."""
    density = make_density(kind).fit(normalize(train_embeds))
    return density, density.score(normalize(test_embeds))


def heldout(n: int, score_fold, folds: int = HELDOUT_FOLDS) -> torch.Tensor:
    """(N,) scores of N clean images, those of each fold i % folds by score_fold(held: (N,) bool mask), which fits
    on the other folds; empty if N < 3. In-sample scores run low; about 1 - q of new clean images exceed the
    q-quantile of held-out ones."""
    folds = min(folds, n)
    if n < 3 or folds < 2:
        return torch.empty(0)
    fold, scores = torch.arange(n) % folds, torch.empty(n)
    for f in range(folds):
        scores[fold == f] = score_fold(fold == f).float().cpu()
    return scores


def heldout_scores(train_embeds: torch.Tensor, kind: str = "torch", folds: int = HELDOUT_FOLDS) -> torch.Tensor:
    """(N, D) clean embeddings -> (N,) held-out scores, image i by a Gaussian fitted without its fold."""
    def score_fold(held):
        held = held.to(train_embeds.device)
        return fit_and_score(train_embeds[~held], train_embeds[held], kind)[1]
    return heldout(train_embeds.shape[0], score_fold, folds)


def quantile_threshold(scores: torch.Tensor, quantile: float) -> float:
    """The `quantile` (in [0, 1]) of `scores`, linearly interpolated between order statistics."""
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile {quantile} is outside [0, 1]")
    return float(torch.quantile(scores.double(), quantile))


def normalized_scores(train_scores: torch.Tensor, test_scores: torch.Tensor) -> torch.Tensor:
    """Test scores standardised by the mean and std of the model's clean training scores, for ensemble averaging."""
    train_scores = train_scores.double()
    std = train_scores.std()
    if not torch.isfinite(std) or std <= 0:
        raise CutPasteError("cannot normalise anomaly scores: the clean training scores have no spread "
                            "(fewer than 2 training images, or identical embeddings)")
    return ((test_scores.double() - train_scores.mean()) / std).float()


def ensemble_scores(members: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The ensemble's (N,) scores: normalized_scores(train (M_i,), test (N,)) averaged over the members."""
    if not members:
        raise ValueError("an ensemble needs at least one model")
    return torch.stack([normalized_scores(train, test) for train, test in members]).mean(dim=0)


class PatchGaussians:
    """Gaussians on normalised patch embeddings: one shared, or one per location cell (`local`), as Li et al.
    (appendix A.5) do for aligned objects, where a patch normal in one place (a rim) is a defect in another."""

    def __init__(self, kind: str = "torch", local: bool = False):
        self.kind, self.local = kind, local

    def fit(self, embeds: torch.Tensor, cells: torch.Tensor) -> "PatchGaussians":
        """embeds (N, D) normalised; cells (N,) location cell of each patch."""
        groups = cells if self.local else torch.zeros_like(cells)
        self.parts = [make_density(self.kind).fit(embeds[groups == c]) for c in range(int(groups.max()) + 1)]
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
