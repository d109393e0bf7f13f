"""Ensembles: scores of several models standardised and averaged, and eval.py --ensemble."""
import shutil

import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import dataset
import density
import eval as eval_script
import run_training
from common.errors import CutPasteError
from deploy.detector import Detector

TINY = ["--epochs", "3", "--size", "32", "--batch_size", "4", "--workers", "0", "--no-pretrained", "--device", "cpu"]


def test_normalized_scores_known_case():
    train = torch.tensor([1.0, 2.0, 3.0])  # mean 2, sample std 1
    assert torch.allclose(density.normalized_scores(train, torch.tensor([2.0, 4.0, 0.5])),
                          torch.tensor([0.0, 2.0, -1.5]))
    with pytest.raises(CutPasteError, match="no spread"):
        density.normalized_scores(torch.ones(4), torch.tensor([1.0]))


def test_ensemble_ignores_each_models_scale():
    g = torch.Generator().manual_seed(0)
    a_train, a_test = torch.rand(20, generator=g), torch.rand(8, generator=g)
    b_train, b_test = torch.rand(20, generator=g) * 3, torch.rand(8, generator=g) * 3
    plain = density.ensemble_scores([(a_train, a_test), (b_train, b_test)])
    rescaled = density.ensemble_scores([(a_train * 1000 + 7, a_test * 1000 + 7), (b_train, b_test)])
    assert torch.allclose(plain, rescaled, atol=1e-5)
    expected = (density.normalized_scores(a_train, a_test) + density.normalized_scores(b_train, b_test)) / 2
    assert torch.allclose(plain, expected)


def test_eval_ensemble_of_two_seeds(tmp_path, mvtec_root):
    for seed in (0, 1):
        (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir",
                                     str(tmp_path / f"s{seed}"), "--log_dir", str(tmp_path / "logs"), *TINY,
                                     "--seed", str(seed), "--variant", "normal"])
        (tmp_path / "models").mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / "models" / f"seed{seed}.tch")
    frame = eval_script.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"),
                              "--out_dir", str(tmp_path / "Eval"), "--workers", "0", "--ensemble", "--device", "cpu"])
    table = pd.read_csv(tmp_path / "Eval" / "models_ensemble" / "results.csv")
    assert list(table["category"]) == ["lid", "mean"]
    assert table.loc[0, "models"] == 2 and table.loc[0, "seeds"] == "0+1"
    assert 0 <= table.loc[0, "single_image_auroc_mean"] <= 100
    assert (tmp_path / "Eval" / "models_ensemble" / "lid" / "roc.png").stat().st_size > 1000
    # The same AUROC from each member's scores as predict.py's Detector makes them, standardised by the member's
    # stored clean training scores and averaged, against the truth of the folders.
    paths = [it.path for it in dataset.list_test_items(mvtec_root, "lid")]
    standardised = []
    for seed in (0, 1):
        path = tmp_path / "models" / f"seed{seed}.tch"
        clean = torch.load(path, weights_only=True)["train_scores"].double()
        scores = Detector.load(path, device="cpu", runtime="eager").score(paths).double()
        standardised.append((scores - clean.mean()) / clean.std())
    defective = [int(p.parent.name != "good") for p in paths]
    expected = 100 * roc_auc_score(defective, torch.stack(standardised).mean(dim=0).numpy())
    assert table.loc[0, "image_auroc"] == pytest.approx(expected, abs=1e-6)
    assert frame["image_auroc"].iloc[0] == pytest.approx(expected, abs=1e-6)
    # Refitting each member's Gaussian here scores as the Gaussians stored at the end of training do.
    refit = eval_script.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "models"),
                              "--out_dir", str(tmp_path / "Refit"), "--workers", "0", "--ensemble", "--density",
                              "torch", "--save_plots", "0", "--device", "cpu"])
    assert refit["image_auroc"].iloc[0] == pytest.approx(frame["image_auroc"].iloc[0], abs=1e-3)
