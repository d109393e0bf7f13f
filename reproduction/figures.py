"""reproduce.py's figures: from its CSV, bar charts against Li et al.'s Table 1, a markdown table of all variants
and training curves from the tensorboard logs, to files only.  python reproduce.py --figures_from runs/demo/results.csv"""
import re
import sys
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.errors import CutPasteError
from dataset import MVTEC_CATEGORIES
from storage.files import atomic_write

# Tensorboard scalars that run_training.py writes, and their titles.
CURVES = {"loss": "training loss", "acc": "training accuracy", "lr": "learning rate",
          "test_image_auroc": "test image AUROC (monitoring only)"}
VARIANT_ORDER = ("normal", "scar", "3way", "union")
PAPER = "Li et al. Table 1"
REQUIRED = ("category", "variant", "seed", "backbone", "pretrained", "steps", "size", "image_auroc")
# Extra per-category metrics drawn into the table when the CSV has them (pixel metrics from localization).
EXTRA_METRICS = {"pixel_auroc": "pixel AUROC (%)", "pro": "PRO (%)"}


def load_results(path: Path) -> pd.DataFrame:
    """The CSV with a `series` label per row: which setting, single models or an ensemble."""
    if not path.exists():
        raise CutPasteError(f"results table {path} does not exist; run reproduce.py first or pass --csv")
    frame = pd.read_csv(path, dtype={"seed": str})
    missing = [c for c in REQUIRED if c not in frame]
    if missing or frame.empty:
        raise CutPasteError(f"{path} is not a reproduce.py results table (missing {', '.join(missing) or 'rows'})")
    frame["models"] = frame["models"].fillna(1).astype(int) if "models" in frame else 1
    init = frame["pretrained"].astype(str).map(lambda p: "ImageNet" if p == "True" else "scratch")
    parts = pd.DataFrame({"backbone": frame["backbone"].astype(str), "init": init,
                          "steps": frame["steps"].astype(str) + " steps", "size": frame["size"].astype(str) + " px"})
    frame["setting"] = parts.agg(", ".join, axis=1)
    # Series labels name only what differs between the settings present; settings_text lists them in full.
    differing = [c for c in parts if parts[c].nunique() > 1]
    frame["short_setting"] = parts[differing].agg(", ".join, axis=1) if differing else ""
    kind = frame["models"].map(lambda n: "" if n == 1 else f"ensemble of {n}")
    frame["series"] = [", ".join(x for x in (short, k) if x) or "this implementation"
                       for short, k in zip(frame["short_setting"], kind)]
    return frame


def category_order(categories) -> list[str]:
    present = set(categories)
    return [c for c in MVTEC_CATEGORIES if c in present] + sorted(present - set(MVTEC_CATEGORIES))


def variant_order(variants) -> list[str]:
    present = set(variants)
    return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))


def read_paper(path: Path) -> pd.DataFrame:
    """Table 1 in long form: category, variant, image_auroc."""
    table = pd.read_csv(path, comment="#")
    return table.melt(id_vars="category", var_name="variant", value_name="image_auroc").dropna()


def with_means(values: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-seed means over (two or more) categories appended as category 'mean', so the spread is over seeds."""
    if values["category"].nunique() < 2:
        return values
    means = values.groupby(["series", "seed"], as_index=False)[metric].mean().assign(category="mean")
    return pd.concat([values, means], ignore_index=True)


def bar_data(frame: pd.DataFrame, paper: pd.DataFrame, variant: str) -> pd.DataFrame:
    """Our rows of one variant plus the paper's for the same categories, with the mean as a category."""
    ours = frame[frame["variant"] == variant][["category", "series", "seed", "image_auroc"]]
    theirs = paper[(paper["variant"] == variant) & paper["category"].isin(ours["category"])]
    parts = [with_means(ours, "image_auroc")]
    if not theirs.empty and set(ours["category"]) <= set(theirs["category"]):
        parts.append(with_means(theirs.assign(series=PAPER, seed="paper")[list(ours.columns)], "image_auroc"))
    return pd.concat(parts, ignore_index=True)


def plot_bars(data: pd.DataFrame, variant: str, ymin: float, path: Path) -> Path:
    """Grouped bars per category (and the mean): our AUROC (mean, error bar = std over seeds) beside the paper's."""
    order = category_order(data["category"][data["category"] != "mean"])
    order += ["mean"] if len(order) > 1 else []
    fig = Figure(figsize=(max(5.0, 0.8 * len(order) + 2) + 2.5, 4.2))
    ax = fig.subplots()
    hue_order = [s for s in data["series"].unique() if s != PAPER] + ([PAPER] if PAPER in set(data["series"]) else [])
    sns.barplot(data, x="category", y="image_auroc", hue="series", order=order, hue_order=hue_order,
                errorbar="sd", capsize=0.1, ax=ax)
    for bar in ax.patches:  # values written at the foot of each bar, where the error bars cannot hide them
        if bar.get_height() > ymin + 4:
            ax.text(bar.get_x() + bar.get_width() / 2, ymin + 1, f"{bar.get_height():.1f}", rotation=90,
                    ha="center", va="bottom", fontsize=7, color="white")
    ax.set_ylim(ymin, 101)
    title = f"CutPaste ({variant}): image AUROC" + (" beside Li et al., Table 1" if PAPER in hue_order else "")
    ax.set(xlabel="", ylabel="image AUROC (%)", title=title)
    ax.tick_params(axis="x", rotation=45 if len(order) > 4 else 0)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.text(0.01, 0.01, f"y axis starts at {ymin:g}% for readability; error bars (several seeds): "
                         "std over seeds", fontsize=7, color="grey")
    return save(fig, path)


def cell(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.mean():.1f}" if len(values) == 1 else f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def summary_table(frame: pd.DataFrame, paper: pd.DataFrame, metric: str = "image_auroc") -> pd.DataFrame:
    """Categories (and their mean) by variant and series; mean ± std over seeds where there are several."""
    categories = category_order(frame["category"])
    table = pd.DataFrame({"category": categories + (["mean"] if len(categories) > 1 else [])})
    for variant in variant_order(frame["variant"]):
        rows = frame[(frame["variant"] == variant) & frame[metric].notna()]
        for series in rows["series"].unique():
            values = with_means(rows[rows["series"] == series][["category", "series", "seed", metric]], metric)
            table[f"{variant}: {series}"] = [cell(values.loc[values["category"] == c, metric])
                                             for c in table["category"]]
        theirs = paper[(paper["variant"] == variant) & paper["category"].isin(categories)].set_index("category")
        if metric == "image_auroc" and not rows.empty and set(rows["category"]) <= set(theirs.index):
            shown = theirs.loc[category_order(rows["category"]), "image_auroc"]
            table[f"{variant}: {PAPER}"] = [cell(pd.Series([shown[c]])) if c in shown.index else
                                            (cell(pd.Series([shown.mean()])) if c == "mean" else "")
                                            for c in table["category"]]
    return table


def settings_text(frame: pd.DataFrame) -> str:
    lines = []
    for setting, rows in frame.groupby("setting"):
        extra = "".join(f", {col} {rows[col].iloc[0]}" for col in ("batch_size", "head_layer") if col in rows)
        seeds = "; ".join(f"{variant} {', '.join(sorted({s for s in v['seed'] if '+' not in s}, key=int))}"
                          for variant, v in rows.groupby("variant"))
        lines.append(f"- {setting}{extra}; seeds: {seeds}")
    return "\n".join(lines)


def write_table(frame: pd.DataFrame, paper: pd.DataFrame, source: Path, path: Path) -> Path | None:
    """table.md: image AUROC of every variant beside the paper's, and any extra metrics the CSV holds; written
    atomically, or printed (None) where the disk refuses it."""
    parts = [f"<!-- generated by reproduce.py --figures_from {source.name}; regenerate rather than edit -->",
             "Image AUROC (%) per category; mean ± std over seeds where there are several; "
             "`mean` averages the categories listed (the paper's too).", "", settings_text(frame), "",
             summary_table(frame, paper).to_markdown(index=False, stralign="right", disable_numparse=True)]
    for metric, title in EXTRA_METRICS.items():
        if metric in frame and frame[metric].notna().any():
            parts += ["", title, "", summary_table(frame, paper, metric).to_markdown(index=False, stralign="right",
                                                                                   disable_numparse=True)]
    text = "\n".join(parts) + "\n"
    try:
        atomic_write(path, lambda fh: fh.write(text), "w")
    except OSError as err:
        print(text, end="")
        print(f"warning: could not write {path} ({err}); the table above is its only copy", file=sys.stderr)
        return None
    return path


def read_scalars(logdir: Path) -> pd.DataFrame:
    """Every scalar of one tensorboard run folder as rows (tag, step, value)."""
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    rows = [(tag, ev.step, ev.value) for tag in acc.Tags()["scalars"] for ev in acc.Scalars(tag)]
    return pd.DataFrame(rows, columns=["tag", "step", "value"])


def curve_data(frame: pd.DataFrame, window: int) -> pd.DataFrame:
    """The logged scalars of every single-model row whose log folder exists, with a moving average per run."""
    if "logdir" not in frame:
        return pd.DataFrame()
    parts = []
    for _, row in frame[(frame["models"] == 1) & frame["logdir"].notna()].iterrows():
        logdir = Path(str(row["logdir"]))
        if logdir.is_dir():
            scalars = read_scalars(logdir).sort_values(["tag", "step"])
            scalars["smooth"] = scalars.groupby("tag")["value"].transform(
                lambda v: v.rolling(window, min_periods=1).mean())
            scalars.loc[scalars["tag"] == "lr", "smooth"] = scalars["value"]  # a schedule, nothing to average
            parts.append(scalars.assign(category=row["category"], seed=row["seed"], variant=row["variant"],
                                        setting=row["setting"], short_setting=row["short_setting"]))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def plot_curves(data: pd.DataFrame, title: str, window: int, path: Path) -> Path:
    """Loss, accuracy, lr and test AUROC against the step: thin raw values, thick moving average."""
    fig = Figure(figsize=(10, 6.5))
    axes = fig.subplots(2, 2).ravel()
    hue_order = category_order(data["category"])
    for i, (ax, (tag, name)) in enumerate(zip(axes, CURVES.items())):
        sub = data[data["tag"] == tag]
        ax.set(title=name, xlabel="step")
        if sub.empty:
            ax.text(0.5, 0.5, "not logged (run_training.py --test_epochs -1)", ha="center", transform=ax.transAxes)
            continue
        sns.lineplot(sub, x="step", y="value", hue="category", hue_order=hue_order, units="seed", estimator=None,
                     lw=0.7, alpha=0.3, legend=False, ax=ax)
        sns.lineplot(sub, x="step", y="smooth", hue="category", hue_order=hue_order, errorbar="sd", lw=2,
                     legend=i == 0, ax=ax)
        ax.set_ylabel("")
    fig.suptitle(f"{title}\nthin: logged values; thick: moving average over {window} logged points (lr: as scheduled)"
                 f"{' (band: std over seeds)' if data['seed'].nunique() > 1 else ''}", fontsize=10)
    return save(fig, path)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def draw(csv: Path, out_dir: Path, args) -> list[Path]:
    """The table and figures of the results `csv` into `out_dir`, as reproduce.py's `args` ask (--paper, --ymin,
    --window, --curves)."""
    frame = load_results(csv)
    paper = read_paper(args.paper)
    written = [path for path in [write_table(frame, paper, csv, out_dir / "table.md")] if path]
    for variant in variant_order(frame["variant"]):
        written.append(plot_bars(bar_data(frame, paper, variant), variant, args.ymin,
                                 out_dir / f"bars_{slug(variant)}.png"))
    curves = curve_data(frame, args.window) if args.curves else pd.DataFrame()
    for (variant, setting, short), data in (curves.groupby(["variant", "setting", "short_setting"])
                                            if not curves.empty else []):
        name = f"curves_{slug(variant)}" + (f"_{slug(short)}" if short else "") + ".png"
        written.append(plot_curves(data, f"CutPaste ({variant}), {setting}", args.window, out_dir / name))
    print("wrote " + ", ".join(str(p) for p in written))
    return written
