"""The scoring graph (scoring/scorer.py) and how it runs (scoring/inference.py): the Scorer computes the paper's
scores, every runtime gives the eager float32 scores within 1e-4 and the same decisions, and auto picks as
documented."""
import pytest
import torch

import density
from common.errors import CutPasteError
from localization import patches
from scoring import inference
from scoring.scorer import Scorer, cell_slots
from storage import checkpoints
from training.devices import bf16_supported, embed_images

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return checkpoints.build_model(1, 2).eval()


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_cell_slots_group_positions_by_cell_and_invert():
    cell_of = torch.tensor([2, 0, 2, 1, 2, 0])
    order, slot, width = cell_slots(cell_of, 3)
    assert width == 3 and len(order) == 9
    assert torch.equal(order[slot], torch.arange(6)), "each position's slot holds that position"
    assert torch.equal(slot // width, cell_of), "each slot lies in its position's cell"


def test_image_scorer_is_the_mahalanobis_distance_of_the_normalised_embedding():
    model, images = _model(), _images(6, 32)
    embeds = density.normalize(embed_images(model, images, CPU, False, False))
    gaussian = density.GaussianDensityTorch().fit(torch.cat([embeds, embeds.flip(1)]))
    scores, embedded = Scorer(model, gaussian.mean, gaussian.precision, 32)(images)
    assert torch.allclose(embedded, embeds, atol=1e-5), "the graph's second output: the normalised embeddings"
    diff = (embeds - gaussian.mean).double()
    expect = torch.einsum("nd,de,ne->n", diff, gaussian.precision.double(), diff).sqrt()
    assert torch.allclose(scores.double(), expect, rtol=1e-4)


def test_patch_scorer_map_is_the_upsampled_grid_and_its_maximum_the_score():
    model, images = _model(), _images(2, 40)
    mean = torch.randn(512, generator=torch.Generator().manual_seed(3)) / 20
    scorer = Scorer(model, mean, torch.eye(512), 40, 16, 8)
    with torch.inference_mode():
        scores, maps = scorer(images)
        grid = scorer.distances(scorer.embed(images)).view(2, 4, 4)
        # Each patch embedded on its own, cut out by hand: the graph's crops are the grid's patches, row by row.
        t, l = 8, 24
        alone = density.normalize(model.embed(images[1:2, :, t:t + 16, l:l + 16].float() / 255))
    assert grid[1, 1, 3] == pytest.approx(float((alone - mean).norm()), rel=1e-4)  # precision I: Euclidean
    assert grid[1, 1, 3] != pytest.approx(float(grid[1, 3, 1]), rel=1e-3), "rows and columns are not swapped"
    assert torch.allclose(maps, patches.ReceptiveFieldUpsample(40, 40, 16, 8)(grid), atol=1e-6)
    assert maps.shape == (2, 40, 40) and torch.equal(scores, maps.amax(dim=(1, 2)))


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_exported_runtimes_score_as_eager_float32(runtime):
    model, images = _model(), _images(5, 48, seed=1)
    gen = torch.Generator().manual_seed(2)
    embeds = density.normalize(torch.randn(400, 512, generator=gen))
    cells = torch.arange(400) % 9
    local = density.PatchGaussians("torch", local=True).fit(embeds, cells).state_dict()
    cell_of = patches.nearest_cells(48, 48, 32, 8, 8)
    graphs = {"image": Scorer(model, local["mean"][0], local["precision"][0], 48),
              "local patches": Scorer(model, local["mean"], local["precision"], 48, 32, 8, cell_of, patch_batch=7)}
    for name, scorer in graphs.items():
        want = inference.runner(scorer, inference.Settings(CPU, "eager"))(images)
        got = inference.runner(scorer, inference.Settings(CPU, runtime), batch=2)(images)
        assert torch.allclose(got[0], want[0], rtol=1e-4, atol=0), (name, (got[0] / want[0] - 1).abs().max())
        if name == "image":
            assert got[1] is None and want[1] is None
        else:
            assert got[1].shape == (5, 48, 48) and torch.allclose(got[1], want[1], rtol=1e-4, atol=1e-6)


def test_auto_chooses_by_device_backbone_and_flags():
    auto = inference.choose(CPU)
    assert auto.runtime == "onnxruntime" and not auto.amp and "onnxruntime" in auto.describe()
    assert inference.choose(CPU, arch="vit_b_16").runtime == "eager", "a backbone that does not export runs eager"
    assert inference.choose(CPU, export_pays=False).runtime == "eager", "work too short to repay the export"
    eager = inference.choose(CPU, channels_last=False)
    assert eager.runtime == "eager" and not eager.channels_last, "a memory format asked for means eager"
    assert inference.choose(CPU, amp=True).amp and inference.choose(CPU, "eager").channels_last
    trained_bf16 = inference.choose(CPU, trained_amp=True)
    assert trained_bf16.amp == bf16_supported(CPU), "a bf16-trained model is scored in bf16 where it is native"
    assert trained_bf16.runtime == ("eager" if trained_bf16.amp else "onnxruntime")
    with pytest.raises(CutPasteError, match="--runtime onnxruntime runs float32 on the CPU"):
        inference.choose(CPU, "onnxruntime", amp=True)
    with pytest.raises(CutPasteError, match="vit_b_16 does not export"):
        inference.choose(CPU, "openvino", arch="vit_b_16")
    with pytest.raises(CutPasteError, match="unknown --runtime"):
        inference.choose(CPU, "tensorrt")
