"""eval.py's evaluation: image AUROC per category, plots and a table beside the paper's; with anomaly maps
(patches.py, gradcam.py) also pixel AUROC, PRO and heatmap figures."""
import itertools
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import dataset
import density as density_lib
from cli.options import CHECKPOINT_DENSITY, DENSITY_ESTIMATORS
from common.errors import CutPasteError
from common.paper import PAPER_TABLE1, PAPER_TABLE2
from evaluation import metrics
from evaluation import report as html_report
from localization import gradcam
from scoring import inference
from scoring.scorer import Scorer, fit_scorer
from storage import checkpoints, files
from training.devices import keep_freed_memory, resolve_device

# Localization columns of the results tables (present when a category was localized) and their titles.
PIXEL_COLUMNS = {"pixel_auroc": "pixel AUROC (%)", "pro": "PRO (%)",
                 "paper_pixel_auroc": "Li et al. Table 2 pixel AUROC (%)", "map_image_auroc": "map-max image AUROC (%)"}
# Li et al., appendix A.5: for "aligned objects" one Gaussian per location; for the randomly rotated
# objects (hazelnut, screw) and the textures, one Gaussian for all locations.
ALIGNED_CATEGORIES = ("bottle", "cable", "capsule", "metal_nut", "pill", "toothbrush", "transistor", "zipper")
# Dense scoring of an image-level model uses patches of this fraction of the image side (64 of 256).
IMAGE_MODEL_PATCH_FRACTION = 0.25
# Quantiles of a category's map values that span the colour scale of its heatmap figures.
HEATMAP_PERCENTILES = (0.01, 0.99)


def results_folder(args, ensemble: bool = False) -> Path:
    """<--out_dir>/<--model_dir's name>[_ensemble], or the first free <name>-2, -3, ... when that folder holds the
    results of another model folder (its model_dir.txt names it): two runs' tables never overwrite each other."""
    source = str(Path(args.model_dir).resolve())
    base = Path(args.model_dir).name + ("_ensemble" if ensemble else "")
    for n in itertools.count(1):
        out = Path(args.out_dir) / (base if n == 1 else f"{base}-{n}")
        marker = out / "model_dir.txt"
        if not marker.exists() or files.same_folder(marker.read_text(encoding="utf-8").strip(), source):
            break
    files.writable_folder(out, "--out_dir")
    if not marker.exists():
        files.atomic_write(marker, lambda fh: fh.write(source + "\n"), "w")
    return out


def paper_value(table_path: Path, category: str, column: str) -> float:
    """The paper's figure (%) for a category and column (variant or localization mode); NaN where it gives none."""
    table = pd.read_csv(table_path, comment="#").set_index("category")
    if column not in table.columns or category not in table.index:
        return float("nan")
    return float(table.loc[category, column])


def save_plots(out: Path, category: str, test_set, scores: np.ndarray, auroc: float,
               test_emb: np.ndarray | None = None, ensemble: bool = False) -> None:
    from evaluation import plots  # the plotting stack loads only where plots are drawn
    roc = "ensemble image ROC" if ensemble else "image ROC"
    hist = "ensemble scores (standardised)" if ensemble else "anomaly scores"
    labels = test_set.labels.numpy()
    if len(set(labels.tolist())) == 2:
        plots.plot_roc(labels, scores, auroc, f"{category}: {roc}", out / "roc.png")
    plots.plot_score_hist(scores, test_set.defects, f"{category}: {hist}", out / "score_hist.png")
    if test_emb is not None:
        plots.plot_tsne(test_emb, [f"test {d}" for d in test_set.defects], f"{category}: t-SNE of test embeddings",
                        out / "tsne.png")


def inference_settings(args, ckpt: dict, device: torch.device, dense: bool) -> inference.Settings:
    """How this checkpoint's Scorer runs here: --runtime, --amp and --channels_last, or inference.choose's defaults
    (an exported runtime pays for `dense` maps, not for one pass of whole images over the test set)."""
    return inference.choose(device, args.runtime, args.amp, args.channels_last, ckpt["model"].get("arch", "resnet18"),
                            bool(ckpt["config"].get("amp", False)), export_pays=dense)


def image_scorer(args, ckpt: dict, path: Path, train_u8: torch.Tensor | None, settings) -> tuple[Scorer, torch.Tensor]:
    """The image-level Scorer (section 3.3) with the checkpoint's Gaussian or one refit on `train_u8` by --density,
    and the clean training images' scores (N,) on the CPU."""
    if args.density == CHECKPOINT_DENSITY:
        return Scorer.from_checkpoint(ckpt, path), ckpt["train_scores"].float()
    model = checkpoints.model_from_checkpoint(ckpt, path).to(settings.device)
    return fit_scorer(model, train_u8, embedding_settings(settings), kind=args.density)


def embedding_settings(settings):
    """Fitting embeds in PyTorch: the settings' device, and its bf16 and memory format where it runs eager."""
    return settings if settings.runtime == "eager" else inference.Settings(settings.device, "eager", False, True)


def evaluate_category(args, category: str, path: Path, ckpt: dict, device: torch.device) -> dict:
    """Image scores: Mahalanobis distances, or for a patch-level model its anomaly maps' maxima (section 4.2)."""
    size, patch_size = ckpt["size"], ckpt.get("patch_size", 0)
    mode = resolve_mode(args.localization, patch_size, path)
    settings = inference_settings(args, ckpt, device, dense=bool(patch_size))
    test_set = dataset.MVTecTest(args.data_dir, category, size, args.workers, args.layout)
    needs_train = mode == "dense" or args.density != CHECKPOINT_DENSITY
    train_u8 = (dataset.MVTecTrain(args.data_dir, category, size, args.workers, args.layout).images
                if needs_train else None)
    scorer, patch_density = category_scorer(args, category, ckpt, path, train_u8, settings)
    print(f"{category}: scoring with {settings.describe()}")
    scores, second = inference.runner(scorer, settings, progress=scorer.maps).outputs(test_set.images)
    maps = Maps(second, "dense", patch_density) if scorer.maps else \
        anomaly_maps(mode, category, ckpt, path, scorer, train_u8, test_set.images, args, settings)
    scores = scores.numpy()
    auroc = metrics.image_auroc(test_set.labels, scores)
    print(f"{category} AUC: {auroc}")
    out = results_folder(args) / category
    if args.save_plots:
        test_emb = None if scorer.maps else second.numpy()  # an image-level graph's embeddings, for t-SNE
        save_plots(out, category, test_set, scores, auroc, test_emb)
    if args.report:
        html_report.save_category(out, test_set, scores, None if maps is None else maps.maps,
                                  html_report.eval_threshold(ckpt, args, maps.patch_density if maps else ""))
    row = {"category": category, "variant": ckpt["variant"], "image_auroc": 100 * auroc,
           "paper_image_auroc": float("nan") if patch_size else paper_value(PAPER_TABLE1, category, ckpt["variant"]),
           "steps": ckpt["steps"], "size": size, "density": args.density, "checkpoint": path.name,
           "patch_size": patch_size}
    if maps is not None:
        row.update(report(category, test_set, maps, out, bool(args.save_plots), args.max_heatmaps))
    return row


def category_scorer(args, category: str, ckpt: dict, path: Path, train_u8, settings) -> tuple[Scorer, str]:
    """The Scorer of a checkpoint as eval runs it: an image-level model's (image_scorer), or a patch-level model's
    dense one with Gaussians refit on the clean patches (dense_scorer), and the latter's patch density."""
    if ckpt.get("patch_size", 0):
        model = checkpoints.model_from_checkpoint(ckpt, path).to(settings.device)
        return dense_scorer(args, category, ckpt, model, train_u8, settings)
    return image_scorer(args, ckpt, path, train_u8, settings)[0], ""


def _pct(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.1f}"


def write_tables(rows: list[dict], out: Path) -> pd.DataFrame:
    """results.csv and results.md: AUROC (%) per category and the mean, beside the paper's; each written atomically,
    and printed instead where the disk refuses them (the scores took minutes to compute)."""
    frame = pd.DataFrame(rows)
    mean = {col: frame[col].mean() for col in ("image_auroc", "paper_image_auroc", *PIXEL_COLUMNS) if col in frame}
    frame = pd.concat([frame, pd.DataFrame([{"category": "mean", **mean}])], ignore_index=True)
    shown = pd.DataFrame({"category": frame["category"], "variant": frame["variant"].fillna(""),
                          "image AUROC (%)": frame["image_auroc"].map(_pct),
                          "Li et al. Table 1 (%)": frame["paper_image_auroc"].map(_pct),
                          "steps": frame["steps"].map(lambda s: "" if pd.isna(s) else str(int(s)))})
    shown = shown.assign(**{title: frame[col].map(_pct) for col, title in PIXEL_COLUMNS.items() if col in frame})
    text = shown.to_markdown(index=False, stralign="right") + "\n"
    try:
        files.atomic_write(out / "results.csv", lambda fh: frame.to_csv(fh, index=False, lineterminator="\n"), "w")
        files.atomic_write(out / "results.md", lambda fh: fh.write(text), "w")
    except OSError as err:
        print(text, end="")
        print(f"warning: could not write the results tables into {out} ({err}); the table above is their only "
              f"copy", file=sys.stderr)
    return frame


def member_scores(args, category: str, path: Path, ckpt: dict, data: dict, device: torch.device):
    """One member's (train scores, test scores, test set); `data` caches the decoded images per image size."""
    size, refit = ckpt["size"], args.density != CHECKPOINT_DENSITY
    if size not in data or (refit and data[size][0] is None):
        train = dataset.MVTecTrain(args.data_dir, category, size, args.workers, args.layout).images if refit else None
        data[size] = (train, dataset.MVTecTest(args.data_dir, category, size, args.workers, args.layout))
    train_u8, test_set = data[size]
    settings = inference_settings(args, ckpt, device, dense=False)
    scorer, train_scores = image_scorer(args, ckpt, path, train_u8, settings)
    return train_scores, inference.runner(scorer, settings)(test_set.images)[0], test_set


def _common(values: list):
    return values[0] if len(set(values)) == 1 else float("nan")


def note_mixed(category: str, members: list[tuple[Path, dict]]) -> None:
    """Say which settings an ensemble's members differ in: averaging them is allowed, but never silent."""
    settings = {"variant": lambda c: c["variant"], "size": lambda c: c["size"], "arch": lambda c: c["model"]["arch"],
                "head_layer": lambda c: c["model"]["head_layer"], "steps": lambda c: c["steps"]}
    mixed = [f"{key} {', '.join(sorted({str(get(c)) for _, c in members}))}" for key, get in settings.items()
             if len({get(c) for _, c in members}) > 1]
    if mixed:
        print(f"note: the ensemble of {category} mixes {'; '.join(mixed)} (each model is standardised by its own "
              f"clean scores); keep one run's checkpoints in --model_dir to average seeds only")


def evaluate_ensemble(args, category: str, members: list[tuple[Path, dict]], device: torch.device) -> dict:
    """Image AUROC of the members' averaged standardised scores, beside the members' own."""
    data, pairs, singles = {}, [], []
    note_mixed(category, members)
    for path, ckpt in members:
        train_scores, test_scores, test_set = member_scores(args, category, path, ckpt, data, device)
        pairs.append((train_scores, test_scores))
        singles.append(100 * metrics.image_auroc(test_set.labels, test_scores))
    scores = density_lib.ensemble_scores(pairs).numpy()
    auroc = metrics.image_auroc(test_set.labels, scores)
    spread = float(np.std(singles, ddof=1)) if len(singles) > 1 else float("nan")
    print(f"{category} AUC: {auroc}")
    print(f"  ensemble of {len(members)}: single-model AUROC {np.mean(singles):.2f} +- {spread:.2f}% "
          f"(min {np.min(singles):.2f}, max {np.max(singles):.2f})")
    if args.save_plots:
        save_plots(results_folder(args, ensemble=True) / category, category, test_set, scores, auroc, ensemble=True)
    if args.report:
        html_report.save_category(results_folder(args, ensemble=True) / category, test_set, scores, None,
                                  html_report.ensemble_threshold(members))
    return {"category": category, "variant": "+".join(sorted({ckpt["variant"] for _, ckpt in members})),
            "image_auroc": 100 * auroc, "paper_image_auroc": paper_value(PAPER_TABLE1, category, "ensemble"),
            "models": len(members), "seeds": "+".join(str(ckpt["seed"]) for _, ckpt in members),
            "single_image_auroc_mean": float(np.mean(singles)), "single_image_auroc_std": spread,
            "steps": _common([ckpt["steps"] for _, ckpt in members]),
            "size": _common([ckpt["size"] for _, ckpt in members]), "density": args.density,
            "checkpoint": " ".join(path.name for path, _ in members)}


def resolve_mode(requested: str, patch_size: int, path) -> str:
    """--localization: 'auto' is dense for patch-level models and none for image-level ones."""
    if requested == "auto":
        return "dense" if patch_size else "none"
    if requested == "gradcam" and patch_size:
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {patch_size}); GradCAM explains "
                            f"image-level models: use --localization dense for it")
    if requested == "none" and patch_size:
        raise CutPasteError(f"{path} is a patch-level model (--patch_size {patch_size}); its image score comes "
                            f"from its anomaly map: use --localization dense (or auto)")
    return requested


def dense_patch_size(patch_size: int, image_size: int) -> int:
    """The checkpoint's patch size; for an image-level model, a quarter of the image side (64 of 256)."""
    return patch_size or max(1, round(image_size * IMAGE_MODEL_PATCH_FRACTION))


def scorable_images(test_set, category: str) -> torch.Tensor:
    """(N,) bool: images whose pixels can be scored (good ones always; defective ones only with a usable mask)."""
    keep = test_set.has_mask.clone()
    dropped = [str(test_set.items[i].path) for i in torch.nonzero(~keep).flatten().tolist()]
    if dropped:
        warnings.warn(f"{category}: {len(dropped)} defective test image(s) have no usable mask and are left out "
                      f"of the pixel metrics: {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''}")
    return keep


def heatmap_indices(n: int, limit: int) -> list[int]:
    """At most `limit` test images spread evenly over the sorted test set (so over good and each defect type)."""
    if limit <= 0 or n == 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(limit, n)).round().astype(int).tolist()))


def display_range(maps: torch.Tensor) -> tuple[float, float]:
    """One colour scale per category, 1st to 99th percentile, so the most extreme pixels cannot wash out the rest."""
    sample = maps.flatten()
    if sample.numel() > 2_000_000:
        sample = sample[torch.randperm(sample.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    lo, hi = torch.quantile(sample.double(), torch.tensor(HEATMAP_PERCENTILES, dtype=torch.float64)).tolist()
    return lo, hi if hi > lo else lo + 1e-6


def check_eval_args(args) -> None:
    for name in ("stride", "cell_stride", "patch_batch"):
        if getattr(args, name) < 1:
            raise CutPasteError(f"--{name} {getattr(args, name)} is out of range; give a positive number")
    if args.max_heatmaps < 0:
        raise CutPasteError(f"--max_heatmaps {args.max_heatmaps} is negative; give 0 (no heatmaps) or more")


def use_local_density(patch_density: str, category: str) -> bool:
    """--patch_density: 'auto' is per-location for the aligned objects of appendix A.5, shared otherwise."""
    return patch_density == "local" or (patch_density == "auto" and category in ALIGNED_CATEGORIES)


@dataclass(frozen=True)
class Maps:
    """Anomaly maps (N, H, W) of the test images and how they were made."""
    maps: torch.Tensor
    localization: str  # dense or gradcam
    patch_density: str = ""  # dense: shared or local
    gradcam_target: str = ""  # gradcam: density or logit

    def describe(self) -> str:
        if self.localization == "dense":
            return f"dense, {self.patch_density} Gaussian"
        return f"GradCAM of the {self.gradcam_target} score"


def anomaly_maps(mode: str, category: str, ckpt: dict, path: Path, scorer: Scorer, train_u8, test_u8, args,
                 settings) -> Maps | None:
    """An image-level model's maps for --localization `mode` (None for none): GradCAM of its Scorer's score, or a
    dense Scorer of its patches (section 4.2)."""
    if mode == "gradcam":
        eager = embedding_settings(settings)
        target = gradcam.gradcam_target(args.gradcam_target, scorer.prepare(eager.device, eager.channels_last))
        maps = gradcam.gradcam_maps(scorer.model, test_u8, target, eager.device, eager.amp, eager.channels_last)
        return Maps(maps, mode, gradcam_target=args.gradcam_target)
    if mode != "dense":
        return None
    dense, patch_density = dense_scorer(args, category, ckpt, scorer.model.to(settings.device), train_u8, settings)
    dense_settings = inference_settings(args, ckpt, settings.device, dense=True)
    return Maps(inference.runner(dense, dense_settings, progress=True)(test_u8)[1], mode, patch_density)


def dense_scorer(args, category: str, ckpt: dict, model, train_u8, settings) -> tuple[Scorer, str]:
    """A Scorer of `model`'s patches at --stride (the checkpoint's patch size, or a quarter of an image-level model's
    images), its Gaussians fitted on the clean images' patches; and 'local' or 'shared'."""
    local = use_local_density(args.patch_density, category)
    patch = dense_patch_size(ckpt.get("patch_size", 0), int(ckpt["size"]))
    if args.stride > patch:
        raise CutPasteError(f"--stride {args.stride} is larger than the {patch} px patches: pixels between them "
                            f"would get no score; give --stride {patch} or less (paper: 4)")
    kind = args.density if args.density in DENSITY_ESTIMATORS else "torch"  # patch Gaussians are refitted
    scorer, _ = fit_scorer(model, train_u8, embedding_settings(settings), patch, args.stride, kind, local,
                           args.cell_stride, args.patch_batch)
    return scorer, "local" if local else "shared"


def report(category: str, test_set, maps: Maps, out: Path, save_plots: bool, max_heatmaps: int) -> dict:
    """Pixel metrics (%), the image AUROC of the maps' maxima, and pixel_roc.png and heatmaps/ under `out`."""
    keep = scorable_images(test_set, category)
    masks = test_set.masks[keep]
    masks_np, maps_np = masks.cpu().numpy().astype(bool), maps.maps[keep].cpu().numpy()
    scores = {"pixel_auroc": metrics.pixel_auroc(masks_np, maps_np), "pro": metrics.pro_score(masks_np, maps_np)}
    mode = maps.localization
    row = {"localization": mode, "patch_density": maps.patch_density, "pixel_auroc": 100 * scores["pixel_auroc"],
           "pro": 100 * scores["pro"], "paper_pixel_auroc": paper_value(PAPER_TABLE2, category, mode),
           "map_image_auroc": 100 * metrics.image_auroc(test_set.labels, maps.maps.amax(dim=(1, 2)))}
    if maps.gradcam_target:
        row["gradcam_target"] = maps.gradcam_target
    print(f"{category} pixel AUROC: {scores['pixel_auroc']:.4f}  PRO: {scores['pro']:.4f}  ({maps.describe()})")
    if save_plots:
        from evaluation import plots
        labels = masks.flatten().numpy()
        if 0 < labels.sum() < labels.size:
            plots.plot_roc(labels, maps.maps[keep].flatten().numpy(), scores["pixel_auroc"],
                           f"{category}: pixel ROC ({mode})", out / "pixel_roc.png")
        save_heatmaps(test_set, maps.maps, out / "heatmaps", max_heatmaps)
    return row


def save_heatmaps(test_set, maps: torch.Tensor, folder: Path, limit: int) -> list[Path]:
    """Image, mask and overlay for at most `limit` test images, on one colour scale for the category."""
    from evaluation import plots
    vmin, vmax = display_range(maps)
    paths = []
    for i in heatmap_indices(len(test_set), limit):
        item = test_set.items[i]
        mask = test_set.masks[i].numpy() if bool(test_set.has_mask[i]) else None
        paths.append(plots.plot_heatmap(test_set.images[i].permute(1, 2, 0).numpy(), mask, maps[i].numpy(),
                                        vmin, vmax, f"{item.defect}/{item.path.name}",
                                        folder / f"{item.defect}_{item.path.stem}.png"))
    return paths


def run(args) -> pd.DataFrame:
    """eval.py: evaluate every chosen category (or ensemble) and write the tables."""
    check_eval_args(args)
    device = resolve_device(args.device, args.cuda)
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    print(f"evaluating {args.model_dir} on {device}")
    wanted = None if args.type == "all" else dataset.resolve_categories(args.data_dir, args.type, args.layout)
    # --ensemble: one ensemble of every checkpoint per category in --model_dir
    chosen = (checkpoints.by_category if args.ensemble else checkpoints.newest)(args.model_dir, wanted)
    print(dataset.describe(args.data_dir, list(chosen), args.layout))
    out = results_folder(args, ensemble=args.ensemble)
    if args.ensemble:
        rows = [evaluate_ensemble(args, category, members, device) for category, members in chosen.items()]
    else:
        rows = []
        for category, (path, ckpt) in chosen.items():
            if args.head_layer is not None and args.head_layer != ckpt["model"]["head_layer"]:
                print(f"note: --head_layer {args.head_layer} ignored; {path.name} was trained with "
                      f"--head_layer {ckpt['model']['head_layer']}")
            rows.append(evaluate_category(args, category, path, ckpt, device))
    frame = write_tables(rows, out)
    print(f"mean image AUROC: {frame['image_auroc'].iloc[-1]:.2f}% over {len(rows)} categories"
          f"{' (ensembles)' if args.ensemble else ''}; tables in {out}")
    if args.report:
        print(f"report: {html_report.write_eval_page(out, frame, args.model_dir)}")
    return frame
