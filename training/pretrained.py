"""torchvision's ImageNet weights for the backbone (Li et al. train from scratch; --pretrained starts from them),
through torchvision's own loader: it creates the cache folder, downloads once and checks the file's SHA-256."""
import os
import socket
import urllib.error
import urllib.parse
from pathlib import Path

import torch
from torchvision.models import get_model_weights

from common.errors import CutPasteError
from model import ProjectionNet

# How long a weights download may stall before a clear message instead of a hang on a machine without network.
DOWNLOAD_TIMEOUT_S = 20.0


def weights_cache_path(weights) -> Path:
    """Where torchvision's loader keeps `weights`: <torch hub folder>/checkpoints/<the file name in its address>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(weights.url).path)


def load_pretrained_state(weights) -> dict:
    """An ImageNet state dict through torchvision's own loader, which creates the cache folder, downloads once
    when the file is absent and checks the download's SHA-256 against the prefix in its name; a stalled download
    ends after DOWNLOAD_TIMEOUT_S with a clear message instead of a hang."""
    path = weights_cache_path(weights)
    cached = path.exists()
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CutPasteError(pretrained_error(weights, path, cached, err)) from None
    finally:
        socket.setdefaulttimeout(old_timeout)


def pretrained_error(weights, path: Path, cached: bool, err: Exception) -> str:
    """The one-line message for a failure of load_pretrained_state: offline, a corrupt download, or a bad file."""
    if not cached and "invalid hash value" in str(err):  # torch.hub's words for a download that is not the file
        return (f"the download of {weights.url} does not have the SHA-256 its name promises ({err}); nothing was "
                f"kept in {path.parent}: retry, or train with --no-pretrained")
    if not cached and isinstance(err, (urllib.error.URLError, OSError, TimeoutError)):
        return (f"ImageNet weights are not cached at {path} and could not be downloaded ({err}); download "
                f"{weights.url} to that path (or set TORCH_HOME), or train with --no-pretrained")
    return f"cannot read ImageNet weights {path} ({type(err).__name__}: {str(err)[:200]}); delete it and retry"


def load_imagenet_backbone(model: ProjectionNet) -> None:
    """torchvision's default ImageNet weights of the model's architecture, less the classifier, into the backbone."""
    state = load_pretrained_state(get_model_weights(model.arch).DEFAULT)
    state = {k: v for k, v in state.items() if not k.startswith(f"{model.classifier_name}.")}
    model.backbone.load_state_dict(state, strict=True)
