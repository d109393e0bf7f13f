import errno
import os
import stat
import urllib.error

import pytest
import torch
from torchvision.models import ResNet18_Weights, resnet18

from common.errors import CutPasteError
from model import ProjectionNet, head_layers
from storage import checkpoints as engine
from storage import files
from training import pretrained
from training.pretrained import weights_cache_path


def test_shapes_and_head_layout():
    model = ProjectionNet(head_layers(2), 3).eval()
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [512, 512, 128]
    embeds, logits = model(torch.rand(2, 3, 40, 56))
    assert embeds.shape == (2, 512) and logits.shape == (2, 3)


def test_freeze_backbone():
    model = ProjectionNet(head_layers(1), 2)
    model.freeze_backbone(True)
    assert not any(p.requires_grad for p in model.resnet18.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


def test_pretrained_weights_come_from_the_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    reference = resnet18(weights=None)
    path = weights_cache_path(ResNet18_Weights.IMAGENET1K_V1)
    assert path.parent == tmp_path / "checkpoints"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    model = engine.build_model(1, 2)
    pretrained.load_imagenet_backbone(model)
    assert torch.equal(model.resnet18.conv1.weight, reference.conv1.weight)


def test_missing_weights_fail_clearly_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CutPasteError) as err:
        pretrained.load_imagenet_backbone(engine.build_model(1, 2))
    message = str(err.value)
    assert str(tmp_path / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--no-pretrained" in message and ResNet18_Weights.IMAGENET1K_V1.url in message


def test_atomic_save_keeps_the_old_file_when_the_disk_fills_part_way(tmp_path, disk_fills_at):
    target = tmp_path / "ckpt.tch"
    files.atomic_save({"a": torch.ones(2)}, target)
    old = target.read_bytes()
    with disk_fills_at(1 << 20), pytest.raises(OSError) as err:  # 1 MiB of the 4 MiB tensor, then EFBIG
        files.atomic_save({"a": torch.zeros(1 << 20)}, target)
    assert err.value.errno == errno.EFBIG, "the write failed, not the serialiser"
    assert target.read_bytes() == old and torch.equal(torch.load(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.tch"], "no temporary file left behind"


def test_atomic_save_gives_the_mode_of_a_plain_file(tmp_path):
    old = os.umask(0o022)
    try:
        files.atomic_save({"a": torch.ones(2)}, tmp_path / "ckpt.tch")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt.tch").stat().st_mode) == 0o644, "not mkstemp's 0600"
