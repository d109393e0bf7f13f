"""Backbones by name: embedding width read from the model, pretrained weights, checkpoint round trip."""
import pytest
import torch
from torchvision.models import EfficientNet_B0_Weights, efficientnet_b0

import eval as eval_script
import run_training
from common.errors import CutPasteError
from model import ProjectionNet, classification_backbone, head_layers
from storage import checkpoints as engine
from training import pretrained
from training.pretrained import weights_cache_path


@pytest.mark.parametrize("arch,width", [("resnet18", 512), ("resnet50", 2048), ("efficientnet_b0", 1280),
                                        ("efficientnet_b4", 1792), ("mobilenet_v3_small", 1024)])
def test_embedding_width_is_read_from_the_model(arch, width):
    model = ProjectionNet(head_layers(1), 3, arch).eval()
    assert model.embed_dim == width
    assert model.head[0].in_features == width
    with torch.no_grad():
        embeds, logits = model(torch.rand(2, 3, 32, 32))
    assert embeds.shape == (2, width) and logits.shape == (2, 3)


def test_resnet18_keeps_its_checkpoint_keys():
    keys = list(ProjectionNet(head_layers(1), 2).state_dict())
    assert "resnet18.conv1.weight" in keys and not any(k.startswith("resnet18.fc") for k in keys)
    model = ProjectionNet(head_layers(1), 2)
    assert model.backbone is model.resnet18


def test_classifier_and_its_dropout_are_removed():
    net, name, width = classification_backbone("efficientnet_b0")
    assert name == "classifier.1" and width == 1280
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Dropout)) for m in net.classifier.modules())
    with torch.no_grad():
        assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 1280)


def test_unknown_or_unsupported_backbones_fail_clearly():
    with pytest.raises(CutPasteError, match="--arch resnet19"):
        engine.build_model(1, 2, "resnet19")
    with pytest.raises(CutPasteError, match="no Linear classifier"):
        engine.build_model(1, 2, "squeezenet1_0")
    with pytest.raises(CutPasteError, match="not a torchvision classification model"):
        run_training.main(["--arch", "resnet19"])


def test_pretrained_efficientnet_comes_from_the_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = efficientnet_b0(weights=None)
    path = weights_cache_path(EfficientNet_B0_Weights.IMAGENET1K_V1)
    assert path.name.startswith("efficientnet_b0")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = engine.build_model(1, 2, "efficientnet_b0")
    pretrained.load_imagenet_backbone(model)
    assert torch.equal(model.efficientnet_b0.features[0][0].weight, reference.features[0][0].weight)


def test_efficientnet_checkpoint_round_trip_and_eval(tmp_path, mvtec_root, training_scores_again):
    (path,) = run_training.main(["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(tmp_path / "m"),
                                 "--log_dir", str(tmp_path / "logs"), "--arch", "efficientnet_b0", "--size", "32",
                                 "--epochs", "3", "--batch_size", "4", "--no-pretrained", "--workers", "0",
                                 "--variant", "normal", "--device", "cpu"])
    ckpt = engine.read_checkpoint(path)
    assert ckpt["model"]["arch"] == "efficientnet_b0" and ckpt["model"]["embed_dim"] == 1280
    assert ckpt["config"]["arch"] == "efficientnet_b0"
    assert ckpt["density"]["precision"].shape == (1280, 1280)
    # The file's model and Gaussian score the clean training images as training did (batch norm statistics,
    # the classifier's removal and the stored Gaussian all round-trip).
    stored, again = training_scores_again(path)
    assert stored.std() > 0
    torch.testing.assert_close(again, stored, rtol=1e-4, atol=1e-4)
    frame = eval_script.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "m"),
                              "--out_dir", str(tmp_path / "Eval"), "--save_plots", "0", "--workers", "0"])
    assert 0 <= frame["image_auroc"].iloc[0] <= 100
    gradcam = eval_script.main(["--data_dir", str(mvtec_root), "--model_dir", str(tmp_path / "m"),
                                "--out_dir", str(tmp_path / "Eval"), "--save_plots", "1", "--max_heatmaps", "1",
                                "--workers", "0", "--localization", "gradcam"])
    assert 0 <= gradcam["pixel_auroc"].iloc[0] <= 100, "GradCAM hooks the efficientnet's feature maps"
    assert len(list((tmp_path / "Eval" / "m" / "lid" / "heatmaps").glob("*.png"))) == 1


def test_gradcam_hooks_the_last_feature_map_block_of_each_backbone():
    from localization.gradcam import _capture_last_feature_maps
    blocks = {"resnet18": lambda net: net.layer4, "efficientnet_b0": lambda net: net.features,
              "mobilenet_v3_small": lambda net: net.features}
    for arch, block in blocks.items():
        model = engine.build_model(0, 2, arch).eval()
        expected, captured = [], {}
        handle = block(model.backbone).register_forward_hook(lambda _m, _i, out: expected.append(out))
        hooks = _capture_last_feature_maps(model.backbone, captured)
        with torch.no_grad():
            model(torch.rand(1, 3, 64, 64))
        for hook in (handle, *hooks):
            hook.remove()
        assert captured["features"] is expected[0], f"{arch}: not its last feature-map block"
