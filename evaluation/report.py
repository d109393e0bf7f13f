"""One HTML page per evaluation (eval.py) and per prediction run (predict.py --report): every image as a card
(thumbnail, heatmap overlay where the model has maps, the mask's outline, defect type, score, decision), sorted by
score with the detector's threshold drawn between the cards and the mistakes at it one click away.

The page opens from the disk with no network: inline CSS and script, no fonts or libraries from elsewhere, and the
thumbnails as small JPEG files in <page name>_files/ beside it, loaded lazily, so that a page of thousands of test
images stays light. Every file is written atomically (files.atomic_write), the page last. The threshold is
predict.py's: the --quantile of the checkpoint's held-out clean training scores (Li et al., CVPR 2021, section 3.3:
the Mahalanobis distance to the Gaussian of clean embeddings).
"""
import html
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage

import density as density_lib
from cli.options import CHECKPOINT_DENSITY
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE
from scoring.scorer import score_stride
from storage import checkpoints, files

PAGE_NAME = "report.html"
CARDS_NAME = "scores.csv"  # a category's per-image table, beside its plots
THUMB_SIDE = 128  # px, as shown: images larger than this are shrunk, smaller ones kept (the page scales them)
JPEG_QUALITY = 85
HEATMAP_ALPHA = 0.5  # as the heatmap figures of plots.plot_heatmap
OUTLINE_RGB = (255, 0, 255)  # the mask's outline: magenta, which neither the jet colour map nor most parts show
COLOUR_PERCENTILES = (1, 99)  # the overlays' colour scale spans these percentiles of a run's map values
WRITERS = 8  # threads encoding and writing thumbnails (each write waits on its fsync)
ANOMALOUS, NORMAL = "anomalous", "normal"
LEGEND = ("Each card: the image, a defect's mask outlined in magenta, and the anomaly map over it where the model "
          "makes maps; its score, type and decision at the threshold. Mistakes at the threshold are framed red; a "
          "count of them shows only them.")
PLOTS = (("roc.png", "image ROC"), ("score_hist.png", "score histogram"), ("pixel_roc.png", "pixel ROC"))


@dataclass(frozen=True)
class Threshold:
    value: float | None  # None where the checkpoint holds nothing to calibrate on
    source: str  # what it is the quantile of
    note: str = ""  # why the counts at it may differ from predict.py's decisions


def files_folder(page: Path) -> Path:
    """The thumbnails' folder beside the page: report.html -> report_files/ (as browsers save a page)."""
    return page.with_name(page.stem + "_files")


# ---------------------------------------------------------------- thumbnails

def colour_range(maps: np.ndarray) -> tuple[float, float]:
    """One colour scale for a run's overlays, so that a clean image's map looks cool beside a defect's."""
    sample = maps.reshape(-1)[:: max(1, maps.size // 2_000_000)]  # a strided sample bounds the sort
    lo, hi = np.percentile(sample, COLOUR_PERCENTILES).tolist()
    return lo, hi if hi > lo else lo + 1e-6


def blend_heatmap(img: Image.Image, heat01: np.ndarray) -> Image.Image:
    """`img` with a heatmap (H, W) in [0, 1] blended in through the jet colour map, resized to the image."""
    from matplotlib import colormaps  # only where there are maps: the plotting stack loads in a second
    colour = Image.fromarray((colormaps["jet"](heat01)[..., :3] * 255).astype(np.uint8))
    return Image.blend(img, colour.resize(img.size, Image.BILINEAR), HEATMAP_ALPHA)


def thumbnail(image: torch.Tensor, mask: np.ndarray | None, heat: np.ndarray | None,
              scale: tuple[float, float] | None) -> Image.Image:
    """uint8 (3, H, W) -> a thumbnail, the heatmap (H, W) blended in on `scale` when given, the mask's outline."""
    side = min(THUMB_SIDE, image.shape[-1])
    img = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((side, side), Image.BILINEAR)
    if heat is not None:
        lo, hi = scale
        img = blend_heatmap(img, np.clip((heat - lo) / (hi - lo), 0, 1))
    if mask is None or not mask.any():
        return img
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), Image.NEAREST)) > 127
    edge = small & ~ndimage.binary_erosion(small, iterations=max(1, side // 64))  # 2 px wide at 128 px
    pixels = np.array(img)
    pixels[edge] = OUTLINE_RGB
    return Image.fromarray(pixels)


def save_jpeg(img: Image.Image, path: Path) -> None:
    """Full-resolution colour (4:4:4), so that the thin outline keeps its colour."""
    files.atomic_write(path, lambda fh: img.save(fh, "JPEG", quality=JPEG_QUALITY, subsampling=0))


def write_thumbnails(folder: Path, names: list[str], images: torch.Tensor, masks: list, maps: np.ndarray | None,
                     scale) -> list[tuple[str, str]]:
    """Each image's thumbnail <name>.jpg and, with maps, its overlay <name>_map.jpg in `folder`; their paths."""
    def one(i: int) -> tuple[str, str]:
        plain, over = folder / f"{names[i]}.jpg", folder / f"{names[i]}_map.jpg"
        save_jpeg(thumbnail(images[i], masks[i], None, None), plain)
        if maps is None:
            return str(plain), ""
        save_jpeg(thumbnail(images[i], masks[i], maps[i], scale), over)
        return str(plain), str(over)
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        return list(pool.map(one, range(len(names))))


# ---------------------------------------------------------------- thresholds and decisions

def stored_threshold(ckpt: dict, quantile: float = DEFAULT_QUANTILE) -> Threshold:
    """predict.py's default threshold for this checkpoint: the quantile of its held-out clean training scores (or
    of what checkpoints.calibration falls back to for older checkpoints)."""
    scores, source = checkpoints.calibration(ckpt, score_stride(ckpt))
    if not scores:
        return Threshold(None, source)
    value = density_lib.quantile_threshold(torch.tensor(scores), quantile)
    return Threshold(value, f"{quantile} quantile of the {source}")


def eval_threshold(ckpt: dict, args, patch_density: str = "") -> Threshold:
    """stored_threshold, with a note where eval.py scores otherwise than predict.py does (another stride or
    location Gaussians for a patch-level model, a refitted Gaussian)."""
    found, patch = stored_threshold(ckpt), int(ckpt.get("patch_size", 0))
    stride = score_stride(ckpt)
    if patch and (args.stride != stride or patch_density == "local"):
        note = (f"predict.py scores this patch-level model at stride {stride} with one shared Gaussian; these "
                f"maps are scored at stride {args.stride} with {patch_density} Gaussians, so the "
                f"counts at its threshold only approximate its decisions")
    elif not patch and args.density != CHECKPOINT_DENSITY:
        note = f"the Gaussian is refitted here (--density {args.density}); predict.py scores with the checkpoint's"
    else:
        note = ""
    return Threshold(found.value, found.source, note)


def ensemble_threshold(members: list[tuple[Path, dict]], quantile: float = DEFAULT_QUANTILE) -> Threshold:
    """The quantile of the members' held-out clean scores, standardised and averaged as the test scores are."""
    pairs = [(ckpt["train_scores"].float(), torch.tensor(checkpoints.calibration(ckpt, 0)[0]))
             for _, ckpt in members]
    if len({len(held) for _, held in pairs}) != 1 or len(pairs[0][1]) == 0:
        return Threshold(None, "none: a member holds no clean scores to calibrate on, or the members hold "
                               "different numbers of them")
    value = density_lib.quantile_threshold(density_lib.ensemble_scores(pairs), quantile)
    return Threshold(value, f"{quantile} quantile of the members' standardised, averaged held-out clean scores")


def with_decisions(cards: pd.DataFrame, threshold: Threshold) -> pd.DataFrame:
    """decision (anomalous above the threshold, as predict.py decides) and mistake: fp, fn or '' where the truth
    (0 good, 1 defective; NaN unknown) disagrees."""
    value = math.nan if threshold.value is None else threshold.value
    flagged = cards["score"] > value
    decision = np.where(flagged, ANOMALOUS, NORMAL) if threshold.value is not None else ""
    truth = cards["truth"]
    mistake = np.where((truth == 0) & flagged, "fp", np.where((truth == 1) & ~flagged, "fn", ""))
    return cards.assign(decision=decision, mistake=mistake if threshold.value is not None else "",
                        threshold=value, threshold_source=threshold.source, threshold_note=threshold.note)


# ---------------------------------------------------------------- eval.py

def save_category(out: Path, test_set, scores, maps: torch.Tensor | None, threshold: Threshold) -> Path:
    """One category's thumbnails (report_files/<category>/ beside the page) and its per-image table
    out/scores.csv, from which write_eval_page builds the page after the last category."""
    page = out.parent / PAGE_NAME
    heat = None if maps is None else maps.float().cpu().numpy()
    masks = [m.numpy() if bool(has) else None for m, has in zip(test_set.masks, test_set.has_mask)]
    names = [f"{i:04d}" for i in range(len(test_set))]
    thumbs = write_thumbnails(files_folder(page) / out.name, names, test_set.images, masks, heat,
                              None if heat is None else colour_range(heat))
    cards = pd.DataFrame({"path": [str(it.path) for it in test_set.items], "defect": test_set.defects,
                          "truth": test_set.labels.numpy(), "score": np.asarray(scores, dtype=float),
                          "image": [Path(a).relative_to(out.parent).as_posix() for a, _ in thumbs],
                          "overlay": [Path(b).relative_to(out.parent).as_posix() if b else "" for _, b in thumbs]})
    cards = with_decisions(cards, threshold)
    files.atomic_write(out / CARDS_NAME, lambda fh: cards.to_csv(fh, index=False), "w")
    return out / CARDS_NAME


def markdown_table(text: str) -> str:
    """results.md (a pipe table) as an HTML table."""
    rows = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.strip().startswith("|") and not set(line) <= set("|:- ")]
    if not rows:
        return ""
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def eval_facts(row: pd.Series) -> list[str]:
    """The category's metrics from its results row, for its section's heading."""
    facts = [f"image AUROC {row['image_auroc']:.1f}%"]
    if not pd.isna(row.get("paper_image_auroc", math.nan)):
        facts[0] += f" (Li et al.: {row['paper_image_auroc']:.1f}%)"
    for col, name in (("pixel_auroc", "pixel AUROC"), ("pro", "PRO")):
        if not pd.isna(row.get(col, math.nan)):
            facts.append(f"{name} {row[col]:.1f}%")
    return facts


def write_eval_page(out: Path, frame: pd.DataFrame, model_dir: Path) -> Path:
    """eval.py's report.html in `out`: the results table, then per category its plots, threshold, counts at it and
    cards (from the scores.csv each category's save_category wrote)."""
    sections, categories, defects = [], [], set()
    for _, row in frame[frame["category"] != "mean"].iterrows():
        folder = out / row["category"]
        if not (folder / CARDS_NAME).exists():
            continue
        cards = pd.read_csv(folder / CARDS_NAME, keep_default_na=False, na_values={"threshold": [""]})
        plots = [(f"{row['category']}/{name}", title) for name, title in PLOTS if (folder / name).exists()]
        first = cards.iloc[0]
        threshold = Threshold(None if pd.isna(first["threshold"]) else float(first["threshold"]),
                              first["threshold_source"], first["threshold_note"])
        sections.append(render_section(row["category"], cards, threshold, eval_facts(row), plots))
        categories.append(row["category"])
        defects |= set(cards["defect"].astype(str))
    table = markdown_table((out / "results.md").read_text()) if (out / "results.md").exists() else ""
    intro = (f"<p>Checkpoints in <code>{html.escape(str(model_dir))}</code>, evaluated "
             f"{datetime.now():%Y-%m-%d %H:%M}.</p>{table}")
    text = render_page(f"CutPaste evaluation: {Path(model_dir).name}", intro, sections, categories, defects)
    page = out / PAGE_NAME
    files.atomic_write(page, lambda fh: fh.write(text.encode("utf-8")))
    return page


# ---------------------------------------------------------------- predict.py

def check_page(page: Path, inputs: list[Path]) -> Path:
    """--report: an .html file that can be written, neither an input nor a folder above an input's thumbnail
    names; refused before any scoring, as the other outputs are."""
    page = Path(page)
    if page.suffix.lower() not in (".html", ".htm"):
        raise CutPasteError(f"--report {page}: give a file name ending in .html, e.g. {page.with_suffix('.html')}")
    files.writable_file(page, "--report")
    folder = files_folder(page).resolve()
    clash = next((p for p in inputs if Path(p).resolve() == page.resolve() or folder in Path(p).resolve().parents),
                 None)
    if clash is not None:
        raise CutPasteError(f"--report {page} would write over or beside the input {clash} (its thumbnails go to "
                            f"{files_folder(page)}); choose a --report outside the inputs")
    return page


class PredictionPage:
    """predict.py --report: writes each scored image's thumbnails while Detector.predict runs (on_batch), then the
    page, from the results."""

    def __init__(self, page: Path, inputs: list[Path]):
        self.page = check_page(page, inputs)
        self.names = {str(p): f"{i:05d}" for i, p in enumerate(inputs)}
        self.thumbs: dict[str, tuple[str, str]] = {}
        self.scale = None

    def watch(self, then=None):
        """An on_batch callback of Detector.predict writing the thumbnails (with a patch-level model's maps), then
        calling `then` (the overlays)."""
        def on_batch(paths, images, scores, maps):
            heat = None if maps is None else maps.float().cpu().numpy()
            if heat is not None and self.scale is None:
                self.scale = colour_range(heat)  # the first batch fixes the scale for the whole page
            found = write_thumbnails(files_folder(self.page), [self.names[p] for p in paths], images,
                                     [None] * len(paths), heat, self.scale)
            self.thumbs.update(zip(paths, found))
            if then is not None:
                then(paths, images, scores, maps)
        return on_batch

    def write(self, results: list, threshold: float, source: str, category: str, truth_of=None) -> Path:
        """The page: one card per scored image (Prediction), the unreadable files listed; truth_of(path) -> 0/1
        (e.g. from the folder names) marks the mistakes."""
        scored = [r for r in results if r.path in self.thumbs]

        def rel(path: str) -> str:
            return Path(os.path.relpath(path, self.page.parent)).as_posix() if path else ""
        cards = pd.DataFrame({"path": [r.path for r in scored], "defect": [Path(r.path).parent.name for r in scored],
                              "truth": [truth_of(r.path) if truth_of else math.nan for r in scored],
                              "score": [r.score for r in scored],
                              "image": [rel(self.thumbs[r.path][0]) for r in scored],
                              "overlay": [rel(self.thumbs[r.path][1]) for r in scored]})
        cards = with_decisions(cards, Threshold(threshold, source))
        errors = [(r.path, r.error) for r in results if r.path not in self.thumbs]
        flagged = int((cards["decision"] == ANOMALOUS).sum())
        facts = [f"{len(cards)} images scored", f"{flagged} anomalous", f"{len(errors)} unreadable"]
        section = render_section(category or "images", cards, Threshold(threshold, source), facts, [])
        intro = f"<p>Scored {datetime.now():%Y-%m-%d %H:%M}; the folder an image lies in is its type.</p>"
        text = render_page(f"CutPaste predictions: {category}", intro, [section], [category or "images"],
                           set(cards["defect"]), errors)
        files.atomic_write(self.page, lambda fh: fh.write(text.encode("utf-8")))
        return self.page


# ---------------------------------------------------------------- HTML

def render_card(card) -> str:
    """One image: its thumbnail and overlay, type, score, decision and, at the threshold, its mistake."""
    mistake = {"fp": "false positive", "fn": "false negative"}.get(card.mistake, "")
    name = html.escape(Path(card.path).name)
    pics = "".join(f'<img src="{html.escape(quote(src))}" loading="lazy" alt="{name}{alt}" width="{THUMB_SIDE}" '
                   f'height="{THUMB_SIDE}">' for src, alt in ((card.image, ""), (card.overlay, " (map)")) if src)
    truth = "" if pd.isna(card.truth) or card.truth == "" else int(card.truth)
    return (f'<figure class="card {card.mistake} {card.decision}" data-defect="{html.escape(str(card.defect))}" '
            f'data-score="{float(card.score)!r}" data-truth="{truth}" data-decision="{card.decision}" '
            f'data-name="{html.escape(card.path)}"><div class="pics">{pics}</div><figcaption>'
            f'<span class="score">{card.score:.2f}</span><span class="defect">{html.escape(str(card.defect))}</span>'
            f'<span class="decision">{card.decision}</span>'
            f'{f"<span class=mistake-badge>{mistake}</span>" if mistake else ""}'
            f'<span class="name" title="{html.escape(card.path)}">{name}</span></figcaption></figure>')


def threshold_line(threshold: Threshold) -> str:
    return (f'<div class="threshold" role="separator"><span>threshold {threshold.value:.4g}: anomalous above, '
            f'normal below</span></div>')


def render_cards(cards: pd.DataFrame, threshold: Threshold) -> str:
    """The cards, highest score first, the threshold's line between the last card above it and the first below."""
    ordered = cards.sort_values("score", ascending=False, kind="stable")
    parts, drawn = [], threshold.value is None
    for card in ordered.itertuples():
        if not drawn and not card.score > threshold.value:
            parts.append(threshold_line(threshold))
            drawn = True
        parts.append(render_card(card))
    if not drawn:
        parts.append(threshold_line(threshold))
    return "".join(parts)


def mistake_counts(cards: pd.DataFrame, category: str) -> str:
    """False positives among the good images and false negatives among the defective ones, each a filter link."""
    if cards["truth"].isna().all():
        return ""
    fp, fn = int((cards["mistake"] == "fp").sum()), int((cards["mistake"] == "fn").sum())
    good, bad = int((cards["truth"] == 0).sum()), int((cards["truth"] == 1).sum())
    link = f'href="#cat={html.escape(quote(category))}&amp;show=mistakes"'
    return (f'<a class="counts" {link}><b class="fp-count">{fp}</b> false positive{"s" * (fp != 1)} of {good} good, '
            f'<b class="fn-count">{fn}</b> false negative{"s" * (fn != 1)} of {bad} defective</a>')


def render_section(category: str, cards: pd.DataFrame, threshold: Threshold, facts: list[str],
                   plots: list[tuple[str, str]]) -> str:
    """A category: heading, metrics, threshold and counts at it, its plots, its cards."""
    if threshold.value is None:
        thr = f'<span class="thr">no threshold: {html.escape(threshold.source)}</span>'
    else:
        thr = (f'threshold <b class="thr">{threshold.value:.4g}</b> <span class="source">'
               f'({html.escape(threshold.source)})</span>')
    counts = mistake_counts(cards, category) if threshold.value is not None else ""
    note = f'<p class="note">{html.escape(threshold.note)}</p>' if threshold.note else ""
    figs = "".join(f'<a href="{url}"><img src="{url}" alt="{html.escape(title)}" title="{html.escape(title)}"></a>'
                   for url, title in ((html.escape(quote(src)), title) for src, title in plots))
    value = "" if threshold.value is None else repr(threshold.value)
    fp, fn = (int((cards["mistake"] == m).sum()) for m in ("fp", "fn"))
    return (f'<section class="category" data-cat="{html.escape(category)}" data-threshold="{value}" '
            f'data-fp="{fp}" data-fn="{fn}"><h2>{html.escape(category)}</h2><p class="facts">'
            f'{" · ".join(html.escape(f) for f in facts)}</p><p class="facts">{thr}{" · " if counts else ""}{counts}'
            f'</p>{note}{f"<div class=plots>{figs}</div>" if figs else ""}'
            f'<div class="grid">{render_cards(cards, threshold)}</div></section>')


def render_controls(categories: list[str], defects: list[str]) -> str:
    def options(values, everything):
        return f'<option value="">{everything}</option>' + "".join(
            f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
    return (f'<nav class="controls"><label>category <select id="f-cat">{options(categories, "all")}</select></label>'
            f'<label>type <select id="f-defect">{options(defects, "all")}</select></label>'
            '<label>show <select id="f-show"><option value="">all images</option><option value="mistakes">mistakes '
            'at the threshold</option><option value="anomalous">anomalous</option><option value="normal">normal'
            '</option></select></label><label>sort <select id="f-sort"><option value="desc">score, highest first'
            '</option><option value="asc">score, lowest first</option><option value="mistakes">mistakes first'
            '</option><option value="name">file name</option></select></label><span id="shown"></span></nav>')


def render_errors(errors: list[tuple[str, str]]) -> str:
    if not errors:
        return ""
    items = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(e)}</li>" for p, e in errors)
    return f'<section class="errors"><h2>Unreadable files ({len(errors)})</h2><ul>{items}</ul></section>'


def render_page(title: str, intro: str, sections: list[str], categories: list[str], defects: set[str],
                errors: list[tuple[str, str]] = ()) -> str:
    """The whole page: nothing in it loads from the network."""
    ordered = sorted(defects, key=lambda d: (d != "good", d))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title><style>{STYLE}</style>'
            f'</head><body><header><h1>{html.escape(title)}</h1>{intro}<p class="legend">{LEGEND}</p></header>'
            f'{render_controls(categories, ordered)}{render_errors(list(errors))}<main>{"".join(sections)}</main>'
            f'<script>{SCRIPT}</script></body></html>\n')


STYLE = """
:root { --bg: #f6f7f9; --card: #fff; --ink: #1d232b; --muted: #637083; --line: #d9dee5; --bad: #c62828;
  --good: #2e7d32; --accent: #1f5fbf; --warn: #fff4e5; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 18px 28px 8px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 4px; }
code { font: 12px ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
table.results { border-collapse: collapse; background: var(--card); margin: 8px 0; font-size: 13px; }
table.results th, table.results td { border: 1px solid var(--line); padding: 4px 10px; text-align: right; }
table.results th { background: #eef1f5; font-weight: 600; }
table.results td:first-child, table.results th:first-child { text-align: left; }
.controls { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; gap: 14px; align-items: center;
  padding: 10px 28px; background: rgba(246, 247, 249, .96); border-bottom: 1px solid var(--line); }
.controls label { color: var(--muted); }
.controls select { margin-left: 4px; font: inherit; padding: 2px 4px; }
#shown { margin-left: auto; color: var(--muted); }
main { padding: 0 28px 40px; }
section.category { margin: 22px 0; }
.facts { margin: 2px 0; color: var(--muted); }
.legend { color: var(--muted); margin: 4px 0 0; max-width: 900px; }
.facts .thr { color: var(--ink); }
.counts { color: var(--bad); text-decoration: none; border-bottom: 1px dotted var(--bad); }
.note { background: var(--warn); padding: 4px 8px; border-radius: 4px; display: inline-block; margin: 4px 0; }
.plots { display: flex; gap: 10px; margin: 8px 0 12px; flex-wrap: wrap; }
.plots img { height: 190px; background: #fff; border: 1px solid var(--line); border-radius: 4px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
.card { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 6px;
  box-shadow: 0 1px 2px rgba(0, 0, 0, .05); }
.card .pics { display: flex; gap: 4px; }
.card img { width: 128px; height: 128px; object-fit: cover; border-radius: 3px; background: #e4e7eb;
  display: block; }
.card figcaption { display: flex; flex-wrap: wrap; gap: 2px 8px; align-items: baseline; margin-top: 5px;
  width: 0; min-width: 100%; }
.card .score { font-weight: 700; font-variant-numeric: tabular-nums; }
.card .defect { background: #eef1f5; border-radius: 3px; padding: 0 5px; }
.card .decision { color: var(--muted); }
.card.anomalous .decision { color: var(--bad); }
.card.normal .decision { color: var(--good); }
.card .name { flex-basis: 100%; color: var(--muted); font-size: 12px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.card.fp, .card.fn { border: 2px solid var(--bad); background: #fff6f6; }
.mistake-badge { color: #fff; background: var(--bad); border-radius: 3px; padding: 0 5px; font-size: 12px; }
.threshold { flex-basis: 100%; display: flex; align-items: center; gap: 10px; color: var(--accent);
  font-weight: 600; font-size: 13px; }
.threshold::before, .threshold::after { content: ""; flex: 1; border-top: 2px dashed var(--accent); }
.errors { margin: 14px 28px; padding: 8px 14px; background: var(--warn); border-radius: 6px; }
[hidden] { display: none !important; }
"""

# Filtering and sorting in the page itself, no server; the choices live in the address (#cat=...&show=mistakes),
# so that the counts in each heading are links to their mistakes.
SCRIPT = """
(function () {
  const all = (sel, el) => Array.from((el || document).querySelectorAll(sel));
  const box = {cat: 'f-cat', defect: 'f-defect', show: 'f-show', sort: 'f-sort'};
  for (const k in box) box[k] = document.getElementById(box[k]);
  const score = c => parseFloat(c.dataset.score);
  const bad = c => c.classList.contains('fp') || c.classList.contains('fn');
  const order = {
    desc: (a, b) => score(b) - score(a), asc: (a, b) => score(a) - score(b),
    mistakes: (a, b) => (bad(b) - bad(a)) || score(b) - score(a),
    name: (a, b) => a.dataset.name.localeCompare(b.dataset.name)};
  function keep(c, f) {
    if (f.defect && c.dataset.defect !== f.defect) return false;
    if (f.show === 'mistakes') return bad(c);
    return !f.show || c.dataset.decision === f.show;
  }
  function apply() {
    const f = {}; for (const k in box) f[k] = box[k].value;
    let shown = 0, total = 0;
    for (const sec of all('section.category')) {
      const grid = sec.querySelector('.grid'), line = grid.querySelector('.threshold');
      const thr = parseFloat(sec.dataset.threshold), cards = all('.card', grid).sort(order[f.sort] || order.desc);
      let visible = 0, placed = false;
      for (const c of cards) {
        const above = score(c) > thr;
        if (line && !placed && (f.sort === 'desc' ? !above : f.sort === 'asc' ? above : false)) {
          grid.appendChild(line); placed = true;
        }
        c.hidden = !keep(c, f); grid.appendChild(c);
        total++; if (!c.hidden) { visible++; shown++; }
      }
      if (line) { if (!placed) grid.appendChild(line); line.hidden = !(f.sort === 'desc' || f.sort === 'asc'); }
      sec.hidden = (f.cat && sec.dataset.cat !== f.cat) || visible === 0;
      if (sec.hidden) shown -= visible;
    }
    document.getElementById('shown').textContent = shown + ' of ' + total + ' images shown';
    const state = new URLSearchParams();
    for (const k in f) if (f[k] && !(k === 'sort' && f[k] === 'desc')) state.set(k, f[k]);
    try { history.replaceState(null, '', '#' + state.toString()); } catch (e) { /* some file:// pages refuse */ }
  }
  function fromAddress() {
    const state = new URLSearchParams(location.hash.slice(1));
    for (const k in box) {
      const v = state.get(k) || (k === 'sort' ? 'desc' : '');
      if (Array.from(box[k].options).some(o => o.value === v)) box[k].value = v;
    }
    apply();
  }
  for (const k in box) box[k].addEventListener('change', apply);
  window.addEventListener('hashchange', fromAddress);
  fromAddress();
  document.body.dataset.ready = '1';
})();
"""
