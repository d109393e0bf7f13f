"""ResNet18 backbone + projection head (Li et al., CVPR 2021, section 4.1). Modules only: no I/O, no device choice."""
import torch
from torch import nn
from torchvision import models

# ImageNet statistics used by torchvision's pretrained weights; applied inside the model so that
# every caller feeds images in [0, 1] and the checkpoint carries the normalisation with it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Width of the hidden head layers and of the last layer before the classifier, as in the earlier
# reimplementation's README: head_layer x 512, then 128, then the 2- or 3-way output.
HEAD_WIDTH = 512
HEAD_LAST = 128
EMBED_DIM = 512  # ResNet18's pooled feature width


def head_layers(head_layer: int) -> list[int]:
    """Widths of the projection head's hidden layers for --head_layer."""
    return [HEAD_WIDTH] * head_layer + [HEAD_LAST]


def resnet18_backbone() -> nn.Module:
    """torchvision ResNet18 with its classifier removed: (B, 3, H, W) -> (B, 512)."""
    net = models.resnet18(weights=None)
    net.fc = nn.Identity()
    return net


class ProjectionNet(nn.Module):
    """Backbone + MLP head.

    forward(x): x (B, 3, H, W) float in [0, 1] -> (embeds (B, 512), logits (B, num_classes)).
    The embeddings (the backbone's pooled features) feed the Gaussian density; the logits the
    self-supervised CutPaste classification loss.
    """

    def __init__(self, head_dims: list[int], num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.resnet18 = resnet18_backbone()
        layers, width = [], EMBED_DIM
        for dim in head_dims:
            layers += [nn.Linear(width, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
            width = dim
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 512) pooled backbone features."""
        return self.resnet18((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor):
        embeds = self.embed(x)
        return embeds, self.out(self.head(embeds))

    def freeze_backbone(self, frozen: bool) -> None:
        """Stop (or restart) gradient flow into the backbone, for the first --freeze_resnet steps."""
        for param in self.resnet18.parameters():
            param.requires_grad_(not frozen)
