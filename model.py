"""Backbone + projection head (Li et al., CVPR 2021, section 4.1). Modules only: no I/O, no device choice.

The paper uses ResNet18; any torchvision classification model whose classifier ends in a Linear layer can stand in.
"""
import torch
from torch import nn
from torchvision import models

from common.paper import DEFAULT_ARCH  # the paper's backbone, resnet18

# ImageNet statistics, applied inside the model so callers feed [0, 1] and checkpoints carry the normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Head widths as the earlier reimplementation's README: head_layer x 512, then 128, then the 2- or 3-way output.
HEAD_WIDTH = 512
HEAD_LAST = 128


def head_layers(head_layer: int) -> list[int]:
    """Widths of the projection head's hidden layers for --head_layer."""
    return [HEAD_WIDTH] * head_layer + [HEAD_LAST]


def backbone_names() -> list[str]:
    """Names of torchvision's classification models, the values --arch accepts."""
    return models.list_models(module=models)


def classification_backbone(arch: str) -> tuple[nn.Module, str, int]:
    """torchvision model `arch` (random weights), its last Linear layer and the Dropout beside it replaced by
    Identity (so training sees the embedding the density fits): (backbone (B, 3, H, W) -> (B, width), removed
    layer's name, width), e.g. 512 for resnet18."""
    if arch not in backbone_names():
        raise ValueError(f"unknown torchvision classification model {arch!r}")
    net = models.get_model(arch, weights=None)
    if getattr(net, "aux_logits", False):
        raise ValueError(f"{arch} returns auxiliary classifier outputs while training, which are not supported")
    linears = [(name, mod) for name, mod in net.named_modules() if isinstance(mod, nn.Linear)]
    if not linears:
        raise ValueError(f"{arch}: it has no Linear classifier to remove")
    name, linear = linears[-1]
    parent_name, _, leaf = name.rpartition(".")
    parent = net.get_submodule(parent_name)
    setattr(parent, leaf, nn.Identity())
    for child_name, child in parent.named_children():
        if isinstance(child, nn.Dropout):
            setattr(parent, child_name, nn.Identity())
    return net, name, linear.in_features


class ProjectionNet(nn.Module):
    """Backbone + MLP head: x (B, 3, H, W) in [0, 1] -> (embeds (B, embed_dim) for the Gaussian density, logits
    (B, num_classes) for the CutPaste loss). The backbone is registered under the arch's name (self.resnet18)
    so resnet18 checkpoints keep their keys; `backbone` reaches it whatever the name."""

    def __init__(self, head_dims: list[int], num_classes: int, arch: str = DEFAULT_ARCH):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        backbone, self.classifier_name, self.embed_dim = classification_backbone(arch)
        self.arch = arch
        self.add_module(arch, backbone)
        layers, width = [], self.embed_dim
        for dim in head_dims:
            layers += [nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.arch)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, embed_dim) pooled backbone features."""
        return self.backbone((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor):
        embeds = self.embed(x)
        return embeds, self.out(self.head(embeds))

    def freeze_backbone(self, frozen: bool) -> None:
        """Stop (or restart) gradient flow into the backbone, for the first --freeze_resnet steps."""
        for param in self.backbone.parameters():
            param.requires_grad_(not frozen)
