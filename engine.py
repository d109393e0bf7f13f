"""Steps shared by training and evaluation: embedding, density scoring, metrics, checkpoints."""
import datetime
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score
from torchvision.models import get_model_weights

import density as density_lib
from common import CHECKPOINT_FORMAT, CutPasteError, atomic_save, autocast, code_version, load_pretrained_state
from model import DEFAULT_ARCH, IMAGENET_MEAN, IMAGENET_STD, ProjectionNet, head_layers

# Images per forward pass when embedding for the density (no gradients, so it can be large).
EMBED_BATCH = 128
# Keys every checkpoint must hold; a file without them is not one of ours.
CHECKPOINT_KEYS = ("format", "category", "config", "model", "state_dict", "density")


def build_model(head_layer: int, num_classes: int, arch: str = DEFAULT_ARCH) -> ProjectionNet:
    try:
        return ProjectionNet(head_layers(head_layer), num_classes, arch)
    except ValueError as err:
        raise CutPasteError(f"--arch {arch}: {err}; give a torchvision classification model such as "
                            f"resnet18, resnet50 or efficientnet_b0 ... efficientnet_b4") from None


def imagenet_weights(arch: str):
    """torchvision's default ImageNet weights for `arch` (IMAGENET1K_V1 for resnet18 and the efficientnets)."""
    return get_model_weights(arch).DEFAULT


def load_imagenet_backbone(model: ProjectionNet) -> None:
    """Copy torchvision's ImageNet weights for the model's architecture into the backbone; the classifier is dropped."""
    state = load_pretrained_state(imagenet_weights(model.arch))
    state = {k: v for k, v in state.items() if not k.startswith(f"{model.classifier_name}.")}
    model.backbone.load_state_dict(state, strict=True)


@torch.inference_mode()
def embed_images(model: ProjectionNet, images_u8: torch.Tensor, device: torch.device, amp: bool,
                 channels_last: bool, batch: int = EMBED_BATCH) -> torch.Tensor:
    """(N, 3, H, W) uint8 images (any device) -> (N, 512) float32 embeddings on `device`."""
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for start in range(0, images_u8.shape[0], batch):
        x = images_u8[start:start + batch].to(device, non_blocking=True).float().div_(255)
        with autocast(device, amp):
            out.append(model.embed(x.contiguous(memory_format=fmt)).float())
    model.train(was_training)
    return torch.cat(out)


def fit_and_score(train_embeds: torch.Tensor, test_embeds: torch.Tensor, kind: str = "torch"):
    """Fit the Gaussian on normalised clean training embeddings; return (density, test scores)."""
    density = density_lib.make_density(kind).fit(density_lib.normalize(train_embeds))
    return density, density.score(density_lib.normalize(test_embeds))


def image_auroc(labels, scores) -> float:
    """Image-level AUROC (defective = positive); NaN when only one class is present."""
    labels = torch.as_tensor(labels).cpu().numpy()
    if len(set(labels.tolist())) < 2:
        return float("nan")
    return float(roc_auc_score(labels, torch.as_tensor(scores).float().cpu().numpy()))


def make_checkpoint(model: ProjectionNet, args, category: str, steps: int, density, train_scores) -> dict:
    """A self-describing checkpoint: weights, the full config, the fitted density, the code version."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    return {
        "format": CHECKPOINT_FORMAT,
        "code_version": code_version(),
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "category": category,
        "variant": args.variant,
        "size": args.size,
        "patch_size": getattr(args, "patch_size", 0),  # 0: image-level model; else trained on patches this size
        "seed": args.seed,
        "steps": steps,
        "config": config,
        "model": {"arch": model.arch, "head_layer": args.head_layer, "head_dims": head_layers(args.head_layer),
                  "num_classes": model.out.out_features, "embed_dim": model.embed_dim},
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "density": density.state_dict(),
        "train_scores": train_scores.detach().float().cpu(),
    }


def save_checkpoint(ckpt: dict, path: Path) -> None:
    atomic_save(ckpt, path)


def read_checkpoint(path: Path) -> dict:
    """Load and validate a checkpoint file (tensors to CPU); errors name the file."""
    try:
        # mmap: only the tensors that are used are read, so matching a category among many checkpoints is cheap.
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CutPasteError(f"cannot read checkpoint {path} ({type(err).__name__}: {str(err)[:200]}); "
                            f"it may be truncated or not a CutPaste checkpoint: retrain or remove it") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CutPasteError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)}); "
                            f"remove it from the model folder or retrain")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CutPasteError(f"{path} has checkpoint format {ckpt['format']}, this code reads {CHECKPOINT_FORMAT}; "
                            f"retrain it with this version")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: Path) -> ProjectionNet:
    """Rebuild the model from the layout stored in the checkpoint and load its weights strictly."""
    layout = ckpt["model"]
    model = build_model(layout["head_layer"], layout["num_classes"], layout.get("arch", DEFAULT_ARCH))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CutPasteError(f"{path} does not match the model layout it declares ({first[:200]}); "
                            f"it was written by other code: retrain it") from None
    return model


def density_from_checkpoint(ckpt: dict, path: Path, device: torch.device) -> density_lib.GaussianDensityTorch:
    """The image-level Gaussian fitted on the clean training embeddings at the end of training, on `device`."""
    if ckpt.get("patch_size", 0):
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {ckpt['patch_size']}): it scores an image "
                            f"by the maximum of its anomaly map; evaluate it with eval.py --localization dense")
    state = ckpt["density"]
    mean, precision = state.get("mean"), state.get("precision")
    dim = ckpt["model"].get("embed_dim", None if mean is None else mean.shape[-1])  # older files lack embed_dim
    if mean is None or tuple(mean.shape) != (dim,) or precision is None or tuple(precision.shape) != (dim, dim):
        raise CutPasteError(f"{path} holds no Gaussian of {dim}-d embeddings (written by other code); retrain it, "
                            f"or refit the Gaussian with eval.py --density torch")
    return density_lib.GaussianDensityTorch.from_state_dict(state, device)


def normalized_scores(train_scores: torch.Tensor, test_scores: torch.Tensor) -> torch.Tensor:
    """Test scores standardised by the mean and standard deviation of the same model's clean training scores.

    Mahalanobis distances of different models live on different scales; standardising each by its
    own clean-data statistics puts them on one before an ensemble averages them.
    """
    train_scores = train_scores.double()
    std = train_scores.std()
    if not torch.isfinite(std) or std <= 0:
        raise CutPasteError("cannot normalise anomaly scores: the clean training scores have no spread "
                            "(fewer than 2 training images, or identical embeddings)")
    return ((test_scores.double() - train_scores.mean()) / std).float()


def ensemble_scores(members: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Average over models of normalized_scores(train, test): the ensemble's (N,) anomaly scores.

    members: one (train scores (M_i,), test scores (N,)) pair per model, test images in the same order.
    """
    if not members:
        raise ValueError("an ensemble needs at least one model")
    return torch.stack([normalized_scores(train, test) for train, test in members]).mean(dim=0)
