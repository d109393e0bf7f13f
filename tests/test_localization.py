"""Patch batches, dense scoring, receptive-field upsampling, GradCAM, and the localization smoke runs."""
import warnings

import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cutpaste
import dataset
import density
import eval as eval_script
import run_training
from common.errors import CutPasteError
from evaluation import evaluate, metrics
from localization import gradcam, patches
from scoring.scorer import Scorer
from storage import checkpoints as engine
from training.devices import embed_images


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("size,patch,stride", [(256, 64, 4), (100, 32, 12), (40, 40, 4)])
def test_positions_cover_the_image(size, patch, stride):
    pos = patches.patch_positions(size, patch, stride)
    assert pos[0] == 0 and pos[-1] == size - patch
    gaps = pos[1:] - pos[:-1]
    assert (gaps > 0).all() and (gaps <= stride).all()
    with pytest.raises(CutPasteError, match="does not fit"):
        patches.patch_positions(size, size + 1, stride)


@pytest.mark.parametrize("size,patch,stride,cell,tol", [(256, 64, 4, (10, 30), 0), (100, 32, 12, (2, 3), 0),
                                                       (100, 32, 12, (2, 5), 2)])
def test_one_hot_patch_peaks_at_its_centre(size, patch, stride, cell, tol):
    pos = patches.patch_positions(size, patch, stride)
    grid = torch.zeros(1, len(pos), len(pos))
    grid[0, cell[0], cell[1]] = 1.0
    up = patches.ReceptiveFieldUpsample(size, size, patch, stride)(grid)[0]
    assert up.shape == (size, size)
    top, left = int(pos[cell[0]]), int(pos[cell[1]])
    # The patch centre is at top + (patch - 1) / 2, between the two middle pixels of the patch. Where the
    # last patch is closer than `stride` to its neighbour (100 px, stride 12), the peak may move by `tol`.
    centre = torch.tensor([top + (patch - 1) / 2, left + (patch - 1) / 2])
    peak = torch.nonzero(up == up.max()).float()
    assert ((peak - centre).abs() <= 0.5 + tol).all(), (peak, centre)
    # A weighted mean of the overlapping patches: the hot one dominates at its centre and fades with distance.
    r, c = top + patch // 2, left + patch // 2
    assert up.max() > 0.1 and up[r, c] > up[r + 4, c] > up[r + 8, c] and up[r, c] > up[r, c - 5]
    # Nothing leaks outside the patch's receptive field.
    outside = torch.ones(size, size, dtype=torch.bool)
    outside[top:top + patch, left:left + patch] = False
    assert up[outside].abs().max() == 0


def test_pixels_seen_by_one_patch_only_take_its_score():
    pos = patches.patch_positions(100, 32, 12)  # ..., 60, 68: rows and columns 92-99 lie in the last patch only
    grid = torch.zeros(1, len(pos), len(pos))
    grid[0, -1, -1] = 2.0
    up = patches.ReceptiveFieldUpsample(100, 100, 32, 12)(grid)[0]
    assert torch.allclose(up[92:, 92:], torch.tensor(2.0)) and up[:68].abs().max() == 0


def test_upsampling_is_a_weighted_mean():
    grid = torch.full((2, 7, 7), 3.0)
    up = patches.ReceptiveFieldUpsample(64, 64, 16, 8)(grid)
    assert torch.allclose(up, torch.full_like(up, 3.0))
    ramp = torch.arange(7.0).view(1, 1, 7).expand(1, 7, 7)
    up = patches.ReceptiveFieldUpsample(64, 64, 16, 8)(ramp)[0]
    assert (up[:, 1:] >= up[:, :-1] - 1e-6).all(), "monotone scores stay monotone"
    assert up.min() >= 0 and up.max() <= 6 * (1 + 1e-6), "within the scores' range, to float32's rounding"


def test_grid_and_cell_crops():
    img, top, left = patches.grid_crops(2, 40, 48, 16, 12)
    ys, xs = patches.patch_positions(40, 16, 12), patches.patch_positions(48, 16, 12)
    per = len(ys) * len(xs)
    assert len(img) == 2 * per and (img[:per] == 0).all() and (img[per:] == 1).all()
    assert top[len(xs)] == ys[1] and left[1] == xs[1] and top[per - 1] == ys[-1] and left[per - 1] == xs[-1]
    img, top, left, cell = patches.cell_crops(3, 64, 64, 16, 8, seed=1)
    cells = patches.patch_positions(64, 16, 8)  # 0, 8, ..., 48: 7 x 7 cells
    assert len(img) == 3 * 49 and torch.equal(cell[:49], torch.arange(49)) and (img[49:98] == 1).all()
    dy, dx = top - cells[cell // 7], left - cells[cell % 7]
    assert dy.min() >= -4 and dy.max() <= 3 and dx.min() >= -4 and dx.max() <= 3 and len(set(dy.tolist())) > 4
    assert top.min() >= 0 and top.max() <= 48 and torch.equal(top, patches.cell_crops(3, 64, 64, 16, 8, seed=1)[1])
    # Test patches at stride 4 go to the nearest cell: positions 0, 4, ..., 48 -> cells 0, 0 or 1, 1, ...
    near = patches.nearest_cells(64, 64, 16, 4, 8).view(13, 13)
    assert near[0, 0] == 0 and near[2, 2] == 8 and near[12, 12] == 48 and near[0, 4] == 2


def test_crops_are_exact_windows():
    images = (torch.rand(5, 3, 40, 48, generator=gen(1)) * 255).to(torch.uint8)
    idx = torch.tensor([4, 0, 2, 2])
    top, left = patches.sample_crops(4, 40, 48, 16, gen(2))
    assert (top >= 0).all() and (top <= 24).all() and (left >= 0).all() and (left <= 32).all()
    crops = patches.apply_crops(images, idx, top, left, 16)
    for b in range(4):
        t, l = int(top[b]), int(left[b])
        assert torch.equal(crops[b], images[idx[b], :, t:t + 16, l:l + 16])


@pytest.mark.parametrize("variant,k", [("normal", 2), ("3way", 3)])
def test_patch_augmentation_stays_inside_the_patch(variant, k):
    images = (torch.rand(6, 3, 96, 96, generator=gen(3)) * 255).to(torch.uint8)
    before = images.clone()
    x, y = patches.make_patch_batch(images, variant, 8, 64, gen(4))
    assert x.shape == (8 * k, 3, 64, 64) and torch.equal(y, torch.arange(k).repeat_interleave(8))
    assert torch.equal(images, before), "input untouched"
    # The same draws, done by hand: crop first, then the whole augmentation on the 64 x 64 crops only,
    # so nothing outside a crop can reach its augmented views.
    g = gen(4)
    idx = cutpaste.sample_indices(6, 8, g)
    top, left = patches.sample_crops(8, 96, 96, 64, g)
    crops = patches.apply_crops(images, idx, top, left, 64).float() / 255
    x_ref, _ = cutpaste.augment_batch(crops, variant, g)
    assert torch.equal(x, x_ref)
    # Boxes are sized for the patch: CutPaste covers 2-15 % of the patch's area (not of the image's, which
    # would not fit), a scar at most 16 x 25 px (under 10 % of 64 x 64).
    clean = x[:8]
    for view in range(1, k):
        changed = (x[8 * view:8 * (view + 1)] != clean).any(dim=1).flatten(1).float().mean(1)
        assert (changed > 0).all() and (changed < 0.17).all()
    x2, _ = patches.make_patch_batch(images, variant, 8, 64, gen(4))
    assert torch.equal(x, x2), "a seed reproduces the batch"


def _tiny_model():
    torch.manual_seed(0)
    return engine.build_model(1, 2).eval()


@pytest.mark.parametrize("local", [False, True])
def test_score_grid_order_matches_direct_scoring(local):
    model = _tiny_model()
    images = (torch.rand(3, 3, 40, 40, generator=gen(5)) * 255).to(torch.uint8)
    embedder = patches.PatchEmbedder(model, torch.device("cpu"), batch=7)
    fitted = patches.embed_cells(embedder, images, 16, cell_stride=12)
    dens, train_max = patches.fit_patch_density(fitted, 3, local=local)
    assert train_max.shape == (3,) and len(dens.parts) == (9 if local else 1)
    state = dens.state_dict()
    cell_of = patches.nearest_cells(40, 40, 16, 4, 12) if local else None
    scorer = Scorer(model, state["mean"], state["precision"], 40, 16, 4, cell_of, patch_batch=7)
    with torch.inference_mode():
        grids = scorer.distances(scorer.embed(images)).view(3, 7, 7)
    pos = patches.patch_positions(40, 16, 4)  # 0, 4, ..., 24; cells at 0, 12, 24
    assert grids.shape == (3, len(pos), len(pos))
    for n, i, j, cell in [(0, 0, 0, 0), (1, 2, 4, 4), (1, 4, 1, 3), (2, 6, 6, 8)]:
        t, l = int(pos[i]), int(pos[j])
        with torch.inference_mode():
            emb = density.normalize(model.embed(images[n:n + 1, :, t:t + 16, l:l + 16].float() / 255))
        expect = dens.parts[cell if local else 0].score(emb)[0]
        assert grids[n, i, j] == pytest.approx(float(expect), rel=1e-4)


@pytest.mark.parametrize("target", ["density", "logit"])
def test_gradcam_maps_shape_and_sign(target):
    model = _tiny_model()
    images = (torch.rand(5, 3, 64, 64, generator=gen(6)) * 255).to(torch.uint8)
    cpu = torch.device("cpu")
    gauss = density.GaussianDensityTorch().fit(density.normalize(embed_images(model, images[:3], cpu, False,
                                                                                     False)))
    fn = gradcam.gradcam_target(target, Scorer(model, gauss.mean, gauss.precision, 64))
    maps = gradcam.gradcam_maps(model, images, fn, cpu, False, False, batch=2)
    assert maps.shape == (5, 64, 64) and torch.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
    assert not model.training and not model.resnet18.layer4._forward_hooks, "mode kept, hook removed"
    assert all(p.grad is None for p in model.parameters()), "no gradients left on the weights"


def test_gradcam_matches_its_formula_for_a_linear_target():
    """For t = sum_k c_k mean_ij A_kij the GradCAM weights are c_k / (h w): the map is relu(sum_k c_k A_k) / (h w)."""
    model = _tiny_model()
    images = (torch.rand(2, 3, 96, 96, generator=gen(8)) * 255).to(torch.uint8)
    coef = torch.rand(512, generator=gen(9)) - 0.4  # mostly positive: a map with positive and clipped parts
    captured = {}
    hook = model.resnet18.layer4.register_forward_hook(lambda _m, _i, out: captured.update(f=out))

    def linear(embeds, logits):
        return (captured["f"].mean(dim=(2, 3)) * coef).sum(dim=1)

    maps = gradcam.gradcam_maps(model, images, linear, torch.device("cpu"), False, False)
    with torch.no_grad():
        model(images.float() / 255)
    hook.remove()
    feats = captured["f"]  # (2, 512, 3, 3)
    cam = torch.relu(torch.einsum("k,nkhw->nhw", coef, feats) / 9).unsqueeze(1)
    expect = torch.nn.functional.interpolate(cam, size=(96, 96), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(maps, expect, rtol=1e-4, atol=1e-6) and maps.max() > 0


def test_targets():
    assert gradcam.augmented_log_odds(None, torch.tensor([[2.0, 0.0]])).item() == pytest.approx(-2.0)
    three = torch.tensor([[0.0, 1.0, 1.0]])
    assert gradcam.augmented_log_odds(None, three).item() == pytest.approx(1.0 + torch.log(torch.tensor(2.0)).item())
    mean, embeds = torch.zeros(512), torch.zeros(1, 512)
    mean[0], embeds[0, 1] = 1.0, 3.0
    scorer = Scorer(_tiny_model(), mean, torch.eye(512) * 4, 32)
    # normalize(3 e_1) = e_1; diff = e_1 - e_0; 0.5 * 4 * 2 = 4
    assert gradcam.density_target(scorer)(embeds, None).item() == pytest.approx(4.0)


def test_missing_defect_mask_is_left_out_with_a_warning(mvtec_root, tmp_path):
    test_set = dataset.MVTecTest(mvtec_root, "lid", size=32)
    test_set.has_mask[-1] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keep = evaluate.scorable_images(test_set, "lid")
    assert keep.sum() == len(test_set) - 1 and "no usable mask" in str(caught[0].message)
    maps = test_set.masks.float() + 0.1 * torch.rand(test_set.masks.shape, generator=gen(7))
    with pytest.warns(UserWarning, match="no usable mask"):
        row = evaluate.report("lid", test_set, evaluate.Maps(maps, "dense", "shared"), tmp_path, True, 3)
    assert row["pixel_auroc"] == pytest.approx(100.0) and row["pro"] == pytest.approx(100.0)
    assert (tmp_path / "pixel_roc.png").stat().st_size > 1000
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 3


def test_heatmap_choice_and_display_range():
    assert evaluate.heatmap_indices(10, 0) == [] and evaluate.heatmap_indices(3, 8) == [0, 1, 2]
    assert evaluate.heatmap_indices(83, 4) == [0, 27, 55, 82]
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, 0] = 1000.0  # one extreme pixel does not set the scale
    maps[1] = torch.linspace(0, 1, 100).view(10, 10)
    lo, hi = evaluate.display_range(maps)
    assert lo == 0 and hi < 1000


def test_modes():
    assert evaluate.resolve_mode("auto", 64, "m.tch") == "dense" and evaluate.resolve_mode("auto", 0, "m.tch") == "none"
    assert evaluate.resolve_mode("gradcam", 0, "m.tch") == "gradcam"
    with pytest.raises(CutPasteError, match="m.tch is a patch-level model.*--localization dense"):
        evaluate.resolve_mode("gradcam", 64, "m.tch")
    assert evaluate.dense_patch_size(0, 256) == 64 and evaluate.dense_patch_size(16, 32) == 16
    assert evaluate.use_local_density("auto", "bottle") and not evaluate.use_local_density("auto", "screw")
    assert evaluate.use_local_density("local", "lid") and not evaluate.use_local_density("shared", "bottle")


TINY = ["--size", "32", "--epochs", "4", "--batch_size", "4", "--no-pretrained", "--log_every", "2", "--workers", "0"]


def test_patch_model_trains_and_evaluates_densely(tmp_path, mvtec_root, monkeypatch):
    (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(tmp_path / "pm"),
                                 "--log_dir", str(tmp_path / "logs"), "--patch_size", "32", "--variant", "3way",
                                 "--test_epochs", "2", *TINY, "--size", "64"])
    ckpt = engine.read_checkpoint(path)
    assert ckpt["patch_size"] == 32 and ckpt["config"]["patch_size"] == 32 and ckpt["size"] == 64
    assert ckpt["density"]["precision"].shape == (512, 512) and ckpt["train_scores"].shape == (16,)
    common = ["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "pm"), "--out_dir", str(tmp_path / "Eval"),
              "--workers", "0", "--max_heatmaps", "2"]
    made, report = [], evaluate.report

    def keep(category, test_set, maps, *args, **kwargs):  # the maps eval scores
        made.append(maps.maps)
        return report(category, test_set, maps, *args, **kwargs)
    monkeypatch.setattr(evaluate, "report", keep)
    frame = eval_script.main(common + ["--stride", "4"])
    out = tmp_path / "Eval" / "pm"
    table = pd.read_csv(out / "results.csv")
    assert list(table["category"]) == ["lid", "mean"] and table["localization"].iloc[0] == "dense"
    assert "pixel AUROC (%)" in (out / "results.md").read_text()
    assert len(list((out / "lid" / "heatmaps").glob("*.png"))) == 2 and (out / "lid" / "pixel_roc.png").exists()
    # The table's numbers, from the maps eval made and the truth the files give (each defect here has its mask).
    (maps,) = made
    test = dataset.MVTecTest(mvtec_root, "lid", 64)
    defective = [int(it.path.parent.name != "good") for it in test.items]
    masks = test.masks.numpy().astype(bool)
    expected = {"image_auroc": roc_auc_score(defective, maps.amax(dim=(1, 2)).numpy()),
                "map_image_auroc": roc_auc_score(defective, maps.amax(dim=(1, 2)).numpy()),
                "pixel_auroc": roc_auc_score(masks.ravel(), maps.numpy().ravel()),
                "pro": metrics.pro_score(masks, maps.numpy())}
    for column, value in expected.items():
        assert table[column].iloc[0] == pytest.approx(100 * value, abs=1e-4), column
    assert frame["pro"].iloc[-1] == pytest.approx(100 * expected["pro"], abs=1e-4), "the mean of one category"
    with pytest.raises(CutPasteError, match="patch-level model"):
        eval_script.main(common + ["--localization", "gradcam"])
    with pytest.raises(CutPasteError, match="--stride 0 is out of range"):
        eval_script.main(common + ["--stride", "0"])
    with pytest.raises(CutPasteError, match="--stride 33 is larger than the 32 px patches"):
        eval_script.main(common + ["--stride", "33"])  # would leave pixels without a score (NaN maps)
    with pytest.raises(CutPasteError, match="--patch_size 64 must be 0"):
        run_training.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "pm"), "--patch_size", "64",
                           *TINY])
    with pytest.raises(CutPasteError, match="--patch_size 16 is below 32"):
        run_training.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "pm"), "--patch_size", "16",
                           *TINY])


def test_image_model_with_gradcam_and_dense(tmp_path, mvtec_root):
    run_training.main(["--data_dir", str(mvtec_root), "--type", "cap", "--model_dir", str(tmp_path / "im"),
                       "--log_dir", str(tmp_path / "logs"), "--variant", "normal", *TINY])
    common = ["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "im"), "--out_dir", str(tmp_path / "Eval"),
              "--workers", "0", "--max_heatmaps", "1"]
    plain = eval_script.main(common + ["--save_plots", "0"])
    assert "pixel_auroc" not in plain, "image-level models are not localized unless asked"
    for mode in ("gradcam", "dense"):
        frame = eval_script.main(common + ["--localization", mode, "--stride", "8"])
        assert frame["localization"].iloc[0] == mode and 0 <= frame["pixel_auroc"].iloc[0] <= 100
        assert frame["image_auroc"].iloc[0] == pytest.approx(plain["image_auroc"].iloc[0])
    assert len(list((tmp_path / "Eval" / "im" / "cap" / "heatmaps").glob("*.png"))) == 1
