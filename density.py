"""Gaussian density estimators on embeddings (Li et al., CVPR 2021, section 3.3).

The anomaly score of an embedding f is its Mahalanobis distance to the Gaussian fitted on the
clean training embeddings,  sqrt((f - mu)^T Sigma^-1 (f - mu)),  with Sigma the Ledoit-Wolf
shrinkage estimate (Ledoit & Wolf, "A well-conditioned estimator for large-dimensional
covariance matrices", J. Multivariate Analysis 2004), which stays invertible when there are
fewer training images than dimensions. Both estimators expect L2-normalised embeddings
(see `normalize`), as the paper's code does.
"""
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    """L2-normalise each row of (N, D) embeddings."""
    return F.normalize(embeds.float(), p=2, dim=1)


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of (N, D) samples, and the shrinkage in [0, 1].

    Sigma = (1 - s) S + s * mu I with S the empirical covariance, mu = tr(S) / D and
    s = min(beta, delta) / delta, beta and delta as in Ledoit & Wolf (2004), lemmas 3.2-3.4.
    """
    n, d = x.shape
    xc = (x - x.mean(dim=0)).double()
    emp = xc.T @ xc / n
    mu = torch.trace(emp) / d
    sq = xc * xc
    beta_sum = (sq.T @ sq).sum() / n  # sum_k ||x_k x_k^T||_F^2 / n
    delta_sum = (emp * emp).sum()  # ||S||_F^2
    beta = (beta_sum - delta_sum) / (d * n)
    delta = (delta_sum - 2 * mu * torch.trace(emp) + d * mu * mu) / d
    shrinkage = 0.0 if delta == 0 else float(torch.clamp(beta, max=delta) / delta)
    cov = (1 - shrinkage) * emp + shrinkage * mu * torch.eye(d, dtype=emp.dtype, device=emp.device)
    return cov, shrinkage


class GaussianDensityTorch:
    """Mean + Ledoit-Wolf precision, computed with torch on the embeddings' own device."""

    name = "torch"

    def fit(self, embeds: torch.Tensor) -> "GaussianDensityTorch":
        """embeds: (N, D) clean training embeddings (L2-normalised)."""
        self.mean = embeds.float().mean(dim=0)
        cov, self.shrinkage = ledoit_wolf(embeds.float())
        self.precision = torch.linalg.inv(cov).float()
        return self

    def score(self, embeds: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N,) Mahalanobis distances; larger is more anomalous."""
        diff = embeds.float() - self.mean
        return torch.einsum("nd,de,ne->n", diff, self.precision, diff).clamp(min=0).sqrt()

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
        self.model = LedoitWolf().fit(embeds.detach().cpu().double().numpy())
        return self

    def score(self, embeds: torch.Tensor) -> torch.Tensor:
        sq = self.model.mahalanobis(embeds.detach().cpu().double().numpy())
        return torch.from_numpy(sq).clamp(min=0).sqrt().float()

    def state_dict(self) -> dict:
        return {"kind": self.name, "mean": torch.from_numpy(self.model.location_).float(),
                "precision": torch.from_numpy(self.model.precision_).float()}


DENSITIES = {"torch": GaussianDensityTorch, "sklearn": GaussianDensitySklearn}


def as_torch(density, device: torch.device | str | None = None) -> GaussianDensityTorch:
    """The same Gaussian (mean, precision) as a GaussianDensityTorch on `device`, e.g. to differentiate through it."""
    return GaussianDensityTorch.from_state_dict(density.state_dict(), device)


def make_density(name: str):
    """A fresh estimator by name ('torch' or 'sklearn')."""
    if name not in DENSITIES:
        raise ValueError(f"unknown density {name!r}; choose one of {', '.join(DENSITIES)}")
    return DENSITIES[name]()
