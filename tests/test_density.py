import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

import density
from evaluation import metrics


def sample(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.2, 2.0, d)
    return torch.randn(n, d, generator=g) * scales


@pytest.mark.parametrize("n,d", [(200, 16), (20, 64)])
def test_ledoit_wolf_matches_sklearn(n, d):
    x = sample(n, d, 0)
    cov, shrink = density.ledoit_wolf(x)
    ref = LedoitWolf().fit(x.double().numpy())
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-6)
    assert np.allclose(cov.numpy(), ref.covariance_, atol=1e-8)


@pytest.mark.parametrize("n", [300, 40])  # 40 < 512: fewer images than dimensions
def test_torch_and_sklearn_rank_alike(n):
    train = density.normalize(sample(n, 512, 1))
    test = density.normalize(torch.cat([sample(30, 512, 2), sample(10, 512, 3) * 3 + 0.5]))
    s_torch = density.make_density("torch").fit(train).score(test)
    s_sk = density.make_density("sklearn").fit(train).score(test)
    assert torch.isfinite(s_torch).all()
    # The same scores to float32's rounding (about 1e-7 here), so the same ranks but at near ties, which an exact
    # comparison of the orders would hang on.
    assert torch.allclose(s_torch, s_sk, rtol=1e-5)


def test_outliers_score_higher_and_state_round_trip():
    train = sample(500, 8, 4)
    est = density.GaussianDensityTorch().fit(train)
    inliers, outliers = sample(50, 8, 5), sample(50, 8, 6) + 4.0
    assert est.score(outliers).min() > est.score(inliers).median()
    again = density.GaussianDensityTorch.from_state_dict(est.state_dict())
    assert torch.equal(again.score(inliers), est.score(inliers))


def test_unknown_density_name():
    with pytest.raises(ValueError, match="unknown density 'kde'"):
        density.make_density("kde")


def test_image_auroc_known_case():
    assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert metrics.image_auroc([0, 1, 0, 1], [0.0, 1.0, 0.2, 0.9]) == 1.0
    assert np.isnan(metrics.image_auroc([0, 0], [0.1, 0.2]))


@pytest.mark.parametrize("kind", ["torch", "sklearn"])
def test_no_spread_is_a_clear_error_not_a_singular_matrix(kind):
    """Ledoit-Wolf shrinks towards mu * I, which is zero when the embeddings do not vary at all."""
    from common.errors import CutPasteError
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 7, 96):  # identical rows, whose mean may round off them
        row = torch.randn(1, 512, generator=gen)
        with pytest.raises(CutPasteError, match="without any spread"):
            density.make_density(kind).fit(density.normalize(row.repeat(n, 1)))
    density.make_density(kind).fit(density.normalize(torch.randn(2, 8, generator=gen)))  # two distinct images do
