"""Evaluate trained CutPaste models: image AUROC per category, plots, and a table beside the paper's;
with anomaly maps (localization.py) also pixel AUROC, PRO and heatmap figures.

    python eval.py --model_dir models
    python eval.py --density sklearn --save_plots 0 | grep AUC
    python eval.py --model_dir models --ensemble       # every checkpoint per category, scores averaged
    python eval.py --model_dir models_patch --stride 16     # a patch-level model, scored densely
"""
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import dataset
import density as density_lib
import engine
import localization
import plots
from common import CutPasteError, bf16_supported, resolve_device, run_main

# --density: the Gaussian stored in the checkpoint, or one refitted here by the named estimator.
CHECKPOINT_DENSITY = "checkpoint"
DENSITY_CHOICES = (CHECKPOINT_DENSITY, *density_lib.DENSITIES)

PAPER_TABLE = Path(__file__).resolve().parent / "doc" / "paper_table1.csv"
# Localization columns of the results tables (present when a category was localized) and their titles.
PIXEL_COLUMNS = {"pixel_auroc": "pixel AUROC (%)", "pro": "PRO (%)",
                 "paper_pixel_auroc": "Li et al. Table 2 pixel AUROC (%)", "map_image_auroc": "map-max image AUROC (%)"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate CutPaste checkpoints on the MVTec AD test sets.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_dir", type=Path, default=Path("Data"), help="MVTec AD root folder")
    p.add_argument("--type", type=str, default="all",
                   help="comma-separated categories, or 'all' for every category with a checkpoint")
    p.add_argument("--model_dir", type=Path, default=Path("models"), help="folder of checkpoints (*.tch)")
    p.add_argument("--out_dir", type=Path, default=Path("Eval"), help="plots and tables go to out_dir/<model_dir name>")
    p.add_argument("--density", type=str, choices=DENSITY_CHOICES, default=CHECKPOINT_DENSITY,
                   help="Gaussian density of the image embeddings (paper section 3.3): checkpoint (the one fitted on "
                        "the clean training embeddings at the end of training and stored in the checkpoint; no "
                        "training image is read), or refit here on --data_dir's training images with torch "
                        "(Ledoit-Wolf in torch, on the device) or sklearn (scikit-learn's LedoitWolf). Dense "
                        "localization always fits its patch Gaussians here (with sklearn when asked, else torch)")
    p.add_argument("--save_plots", type=int, choices=(0, 1), default=1, help="1 writes ROC, histogram and t-SNE plots")
    p.add_argument("--head_layer", type=int, default=None,
                   help="accepted for compatibility; the checkpoint's own head layout is always used")
    p.add_argument("--workers", type=int, default=4, help="threads that decode images (0: the main thread)")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--cuda", type=str, default=None, help="legacy: --cuda 1 means --device cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for embedding; default: on where the device runs bf16 natively")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format")
    p.add_argument("--ensemble", action=argparse.BooleanOptionalAction, default=False,
                   help="score each category with every checkpoint for it in --model_dir (e.g. 5 seeds), averaging "
                        "their density scores after standardising each by its clean training scores (the paper's "
                        "ensemble, Table 1); tables go to out_dir/<model_dir name>_ensemble")
    p.add_argument("--localization", type=str, choices=localization.MODES, default="auto",
                   help="anomaly maps and pixel metrics: dense (patch scores, paper section 4.2), gradcam "
                        "(image-level models), none, or auto (dense for patch-level models, else none)")
    p.add_argument("--stride", type=int, default=localization.PAPER_STRIDE,
                   help="stride of the test patches in dense scoring (paper: 4); larger is faster and coarser")
    p.add_argument("--patch_density", type=str, choices=localization.PATCH_DENSITIES, default="auto",
                   help="dense scoring: one Gaussian for all patch positions (shared), one per location cell "
                        "(local), or auto: local for the aligned objects of paper appendix A.5 (bottle, cable, "
                        "capsule, metal_nut, pill, toothbrush, transistor, zipper), shared otherwise")
    p.add_argument("--cell_stride", type=int, default=localization.CELL_STRIDE,
                   help="dense scoring: size in pixels of the location cells; the Gaussians are fitted on one "
                        "clean training patch per image and cell")
    p.add_argument("--patch_batch", type=int, default=localization.PATCH_BATCH,
                   help="patches per forward pass in dense scoring")
    p.add_argument("--gradcam_target", type=str, choices=localization.GRADCAM_TARGETS, default="density",
                   help="what GradCAM explains: density (the anomaly detector's Gaussian score of the embedding, "
                        "the paper's 'decision of anomaly detector') or logit (the classifier's log-odds of "
                        "'augmented')")
    p.add_argument("--max_heatmaps", type=int, default=8,
                   help="with --save_plots 1, heatmap figures (image, mask, overlay) for at most this many "
                        "test images per category; 0 for none")
    return p


def checkpoints_by_category(model_dir: Path, wanted: list[str] | None) -> dict[str, list[tuple[Path, dict]]]:
    """Every checkpoint per category, oldest first, matched by the category stored inside each file."""
    if not model_dir.is_dir():
        raise CutPasteError(f"model folder {model_dir} does not exist; train first or pass --model_dir")
    found: dict[str, list[tuple[Path, dict]]] = {}
    for path in sorted(model_dir.glob("*.tch")):
        ckpt = engine.read_checkpoint(path)
        found.setdefault(ckpt["category"], []).append((path, ckpt))
    if not found:
        raise CutPasteError(f"found 0 checkpoints (*.tch) in {model_dir}; train with run_training.py first")
    chosen = {}
    for cat in wanted if wanted is not None else list(found):
        if cat not in found:
            raise CutPasteError(f"no checkpoint for category {cat!r} in {model_dir} "
                                f"(found: {', '.join(sorted(found))}); train it or drop it from --type")
        chosen[cat] = sorted(found[cat], key=lambda pc: (pc[1]["created"], pc[0].name))
    return chosen


def find_checkpoints(model_dir: Path, wanted: list[str] | None) -> dict[str, tuple[Path, dict]]:
    """Newest checkpoint per category, matched by the category stored inside each file."""
    chosen = {}
    for cat, candidates in checkpoints_by_category(model_dir, wanted).items():
        if len(candidates) > 1:
            print(f"note: {len(candidates)} checkpoints for {cat}; using the newest, {candidates[-1][0].name}")
        chosen[cat] = candidates[-1]
    return chosen


def paper_auroc(category: str, variant: str) -> float:
    """The paper's Table 1 image AUROC (%) for this category and variant; NaN where it gives none."""
    table = pd.read_csv(PAPER_TABLE, comment="#").set_index("category")
    if variant not in table.columns or category not in table.index:
        return float("nan")
    return float(table.loc[category, variant])


def save_plots(out: Path, category: str, test_set, scores: np.ndarray, auroc: float,
               test_emb: np.ndarray | None) -> None:
    labels = test_set.labels.numpy()
    if len(set(labels.tolist())) == 2:
        plots.plot_roc(labels, scores, auroc, f"{category}: image ROC", out / "roc.png")
    plots.plot_score_hist(scores, test_set.defects, f"{category}: anomaly scores", out / "score_hist.png")
    if test_emb is not None:
        plots.plot_tsne(test_emb, [f"test {d}" for d in test_set.defects], f"{category}: t-SNE of test embeddings",
                        out / "tsne.png")


def load_model(args, ckpt: dict, path: Path, device: torch.device):
    model = engine.model_from_checkpoint(ckpt, path)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt).eval()


def image_density(args, ckpt: dict, path: Path, model, train_u8: torch.Tensor | None, device: torch.device):
    """The Gaussian of the clean image embeddings (section 3.3), the checkpoint's or refit on `train_u8`, and
    the clean training images' scores (N,) under it, on the CPU."""
    if args.density == CHECKPOINT_DENSITY:
        return engine.density_from_checkpoint(ckpt, path, device), ckpt["train_scores"].float()
    train_emb = engine.embed_images(model, train_u8, device, args.amp, args.channels_last)
    density, train_scores = engine.fit_and_score(train_emb, train_emb, args.density)
    return density, train_scores.float().cpu()


def evaluate_category(args, category: str, path: Path, ckpt: dict, device: torch.device) -> dict:
    """Score one category's test images with its checkpoint: Mahalanobis distances of the image embeddings or,
    for a patch-level model, the maxima of its anomaly maps (section 4.2); AUROC, plots, pixel metrics."""
    model = load_model(args, ckpt, path, device)
    size, patch_size = ckpt["size"], ckpt.get("patch_size", 0)
    mode = localization.resolve_mode(args.localization, patch_size, path)
    test_set = dataset.MVTecTest(args.data_dir, category, size, args.workers)
    needs_train = mode == "dense" or (not patch_size and args.density != CHECKPOINT_DENSITY)
    train_u8 = dataset.MVTecTrain(args.data_dir, category, size, args.workers).images if needs_train else None
    density = test_emb = None
    if not patch_size:
        density, _ = image_density(args, ckpt, path, model, train_u8, device)
        test_emb = engine.embed_images(model, test_set.images, device, args.amp, args.channels_last)
        scores = density.score(density_lib.normalize(test_emb))
    maps, how = localization.compute_maps(mode, category, model, train_u8, test_set.images, patch_size, args,
                                          device, density)
    if patch_size:
        scores = maps.amax(dim=(1, 2))
    scores = scores.float().cpu().numpy()
    auroc = engine.image_auroc(test_set.labels, scores)
    print(f"{category} AUC: {auroc}")
    out = args.out_dir / args.model_dir.name / category
    if args.save_plots:
        save_plots(out, category, test_set, scores, auroc, None if test_emb is None else test_emb.cpu().numpy())
    row = {"category": category, "variant": ckpt["variant"], "image_auroc": 100 * auroc,
           "paper_image_auroc": float("nan") if patch_size else paper_auroc(category, ckpt["variant"]),
           "steps": ckpt["steps"], "size": size, "density": args.density, "checkpoint": path.name,
           "patch_size": patch_size}
    if maps is not None:
        row.update(localization.report(category, test_set, maps, how, out, bool(args.save_plots), args.max_heatmaps))
    return row


def _pct(value: float) -> str:
    return "" if pd.isna(value) else f"{value:.1f}"


def write_tables(rows: list[dict], out: Path) -> pd.DataFrame:
    """results.csv and results.md: AUROC (%) per category and the mean, beside the paper's."""
    frame = pd.DataFrame(rows)
    mean = {"category": "mean", "image_auroc": frame["image_auroc"].mean(),
            "paper_image_auroc": frame["paper_image_auroc"].mean()}
    mean.update({col: frame[col].mean() for col in PIXEL_COLUMNS if col in frame})
    frame = pd.concat([frame, pd.DataFrame([mean])], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "results.csv", index=False)
    shown = pd.DataFrame({
        "category": frame["category"],
        "variant": frame["variant"].fillna(""),
        "image AUROC (%)": frame["image_auroc"].map(_pct),
        "Li et al. Table 1 (%)": frame["paper_image_auroc"].map(_pct),
        "steps": frame["steps"].map(lambda s: "" if pd.isna(s) else str(int(s))),
    })
    for col, title in PIXEL_COLUMNS.items():
        if col in frame:
            shown[title] = frame[col].map(_pct)
    (out / "results.md").write_text(shown.to_markdown(index=False, stralign="right") + "\n")
    return frame


def member_scores(args, category: str, path: Path, ckpt: dict, data: dict, device: torch.device):
    """One ensemble member's (clean training scores, test scores, test set) from its Gaussian (as for a single
    model); `data` caches the decoded images per image size across members."""
    model = load_model(args, ckpt, path, device)
    size, refit = ckpt["size"], args.density != CHECKPOINT_DENSITY
    if size not in data or (refit and data[size][0] is None):
        train = dataset.MVTecTrain(args.data_dir, category, size, args.workers).images if refit else None
        data[size] = (train, dataset.MVTecTest(args.data_dir, category, size, args.workers))
    train_u8, test_set = data[size]
    density, train_scores = image_density(args, ckpt, path, model, train_u8, device)
    test_emb = engine.embed_images(model, test_set.images, device, args.amp, args.channels_last)
    return train_scores, density.score(density_lib.normalize(test_emb)).float().cpu(), test_set


def _common(values: list):
    """The value all members share, or NaN when they differ."""
    return values[0] if len(set(values)) == 1 else float("nan")


def evaluate_ensemble(args, category: str, members: list[tuple[Path, dict]], device: torch.device) -> dict:
    """Image AUROC of the members' standardised scores averaged (engine.ensemble_scores), beside the members' own."""
    data, pairs, singles = {}, [], []
    for path, ckpt in members:
        train_scores, test_scores, test_set = member_scores(args, category, path, ckpt, data, device)
        pairs.append((train_scores, test_scores))
        singles.append(100 * engine.image_auroc(test_set.labels, test_scores))
    scores = engine.ensemble_scores(pairs).numpy()
    auroc = engine.image_auroc(test_set.labels, scores)
    spread = float(np.std(singles, ddof=1)) if len(singles) > 1 else float("nan")
    print(f"{category} AUC: {auroc}")
    print(f"  ensemble of {len(members)}: single-model AUROC {np.mean(singles):.2f} +- {spread:.2f}% "
          f"(min {np.min(singles):.2f}, max {np.max(singles):.2f})")
    if args.save_plots:
        out = args.out_dir / f"{args.model_dir.name}_ensemble" / category
        if len(set(test_set.labels.tolist())) == 2:
            plots.plot_roc(test_set.labels.numpy(), scores, auroc, f"{category}: ensemble image ROC", out / "roc.png")
        plots.plot_score_hist(scores, test_set.defects, f"{category}: ensemble scores (standardised)",
                              out / "score_hist.png")
    variants = sorted({ckpt["variant"] for _, ckpt in members})
    return {"category": category, "variant": "+".join(variants), "image_auroc": 100 * auroc,
            "paper_image_auroc": paper_auroc(category, "ensemble"), "models": len(members),
            "seeds": "+".join(str(ckpt["seed"]) for _, ckpt in members),
            "single_image_auroc_mean": float(np.mean(singles)), "single_image_auroc_std": spread,
            "steps": _common([ckpt["steps"] for _, ckpt in members]),
            "size": _common([ckpt["size"] for _, ckpt in members]), "density": args.density,
            "checkpoint": " ".join(path.name for path, _ in members)}


def ensemble_main(args, wanted: list[str] | None, device: torch.device) -> pd.DataFrame:
    """--ensemble: one ensemble of every checkpoint per category in --model_dir."""
    groups = checkpoints_by_category(args.model_dir, wanted)
    rows = [evaluate_ensemble(args, category, members, device) for category, members in groups.items()]
    out = args.out_dir / f"{args.model_dir.name}_ensemble"
    frame = write_tables(rows, out)
    print(f"mean image AUROC: {frame['image_auroc'].iloc[-1]:.2f}% over {len(rows)} categories "
          f"(ensembles); tables in {out}")
    return frame


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    localization.check_eval_args(args)
    device = resolve_device(args.device, args.cuda)
    if args.amp is None:
        args.amp = bf16_supported(device)
    wanted = None if args.type == "all" else dataset.resolve_categories(args.data_dir, args.type)
    if args.ensemble:
        return ensemble_main(args, wanted, device)
    chosen = find_checkpoints(args.model_dir, wanted)
    rows = []
    for category, (path, ckpt) in chosen.items():
        if args.head_layer is not None and args.head_layer != ckpt["model"]["head_layer"]:
            print(f"note: --head_layer {args.head_layer} ignored; {path.name} was trained with "
                  f"--head_layer {ckpt['model']['head_layer']}")
        rows.append(evaluate_category(args, category, path, ckpt, device))
    frame = write_tables(rows, args.out_dir / args.model_dir.name)
    print(f"mean image AUROC: {frame['image_auroc'].iloc[-1]:.2f}% over {len(rows)} categories; "
          f"tables in {args.out_dir / args.model_dir.name}")
    return frame


if __name__ == "__main__":
    run_main(main)
