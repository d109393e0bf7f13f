"""GradCAM (Selvaraju et al., ICCV 2017) anomaly maps for image-level models (Li et al., section 4.2, figure 5)."""
import torch
import torch.nn.functional as F
from torch import nn

import density as density_lib
from common.errors import CutPasteError
from training.devices import autocast, memory_format

GRADCAM_BATCH = 16  # images per forward/backward pass
POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def augmented_log_odds(embeds: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """GradCAM target 'logit': (B, K) logits -> (B,) log-odds of augmented (any class > 0) over clean (class 0)."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def density_target(scorer):
    """GradCAM target 'density': the image-level Scorer's Gaussian as a negative log-density,
    (f - mu)^T Sigma^-1 (f - mu) / 2 (section 2.3, equation 2), of the L2-normalised embeddings f."""
    def target(embeds: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        normed = F.normalize(embeds, p=2, dim=1)
        return 0.5 * density_lib.squared_mahalanobis(normed, scorer.mean[0], scorer.precision[0])
    return target


def _capture_last_feature_maps(backbone: nn.Module, captured: dict) -> list:
    """Hooks leaving in captured["features"] the last (B, C, h, w) output of a top-level non-pooling block: layer4
    of a ResNet, `features` of an EfficientNet, MobileNet or ConvNeXt."""
    def keep(module, _inputs, out):
        if torch.is_tensor(out) and out.dim() == 4 and not isinstance(module, POOLING):
            captured["features"] = out
    return [child.register_forward_hook(keep) for child in backbone.children()]


def gradcam_maps(model, images_u8: torch.Tensor, target, device: torch.device, amp: bool, channels_last: bool,
                 batch: int = GRADCAM_BATCH) -> torch.Tensor:
    """GradCAM heatmaps (N, H, W): the last block's features weighted by the mean gradients of target(embeds,
    logits) -> (B,), summed, ReLU'd and resized; not normalised per image, so pixel metrics compare them."""
    was_training = model.training
    model.eval()
    captured = {}
    hooks = _capture_last_feature_maps(model.backbone, captured)
    maps = []
    try:
        for start in range(0, images_u8.shape[0], batch):
            x = images_u8[start:start + batch].to(device).float().div_(255)
            x = x.contiguous(memory_format=memory_format(channels_last))
            with torch.enable_grad(), autocast(device, amp):
                embeds, logits = model(x)
                if "features" not in captured:
                    raise CutPasteError(f"GradCAM needs a backbone with convolutional feature maps; {model.arch} "
                                        f"has none: use --localization dense")
                features = captured["features"]
                (grads,) = torch.autograd.grad(target(embeds.float(), logits.float()).sum(), features)
            weights = grads.float().mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * features.detach().float()).sum(dim=1, keepdim=True))
            maps.append(F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0].cpu())
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return torch.cat(maps)


def gradcam_target(name: str, scorer=None):
    """--gradcam_target: 'density' (the image-level Scorer's score, from the Gaussian of the clean training
    embeddings) or 'logit'."""
    if name == "logit":
        return augmented_log_odds
    if scorer is None or scorer.maps:
        raise ValueError("GradCAM target 'density' needs an image-level Scorer")
    return density_target(scorer)
