"""The HTML report of eval.py and predict.py --report: its content (no browser), its refusals, and the pages of a
tiny run loaded in headless Chromium (rendered DOM and a screenshot)."""
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import dataset
import density
import eval as eval_script
import predict
from common.errors import CutPasteError
from common.paper import DEFAULT_QUANTILE
from deploy.detector import Detector
from evaluation import report

BROWSERS = ("chromium-headless-shell", "chromium")
# A link or source that a browser would fetch from the network: http(s)://, protocol-relative //, CSS imports.
NETWORK = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//""", re.I)


class Elements(HTMLParser):
    """Every start tag as (tag, attributes), in document order."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def cards_and_lines(text: str) -> list[dict]:
    """The cards and threshold lines in document order: their attributes, with 'kind' and the card's images."""
    found = []
    for tag, attrs in Elements(text).tags:
        classes = attrs.get("class", "").split()
        if tag == "figure" and "card" in classes:
            found.append({**attrs, "kind": "card", "classes": classes, "imgs": []})
        elif tag == "div" and "threshold" in classes:
            found.append({**attrs, "kind": "threshold"})
        elif tag == "img" and found and found[-1]["kind"] == "card":
            found[-1]["imgs"].append(attrs["src"])
    return found


def sections(text: str) -> list[dict]:
    return [a for t, a in Elements(text).tags if t == "section" and "category" in a.get("class", "")]


class FakeTestSet:
    """Six flat grey 32 px test images, three good and three defective with a square mask, as MVTecTest has them."""

    def __init__(self, root: Path):
        self.defects = ["good", "good", "good", "hole", "hole", "stain"]
        self.items = [SimpleNamespace(path=root / d / f"{i:03d}.png") for i, d in enumerate(self.defects)]
        self.images = torch.stack([torch.full((3, 32, 32), 100 + 10 * i, dtype=torch.uint8) for i in range(6)])
        self.labels = torch.tensor([0, 0, 0, 1, 1, 1])
        self.masks = torch.zeros(6, 32, 32, dtype=torch.bool)
        self.masks[3:, 4:28, 4:28] = True
        self.has_mask = torch.ones(6, dtype=torch.bool)

    def __len__(self):
        return len(self.items)


def test_page_content_without_a_browser(tmp_path):
    test_set = FakeTestSet(tmp_path / "data")
    scores = np.array([1.0, 3.0, 2.0, 4.0, 2.2, 5.0])  # at 2.5: good 3.0 is a false positive, hole 2.2 a false negative
    maps = torch.rand(6, 32, 32, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "Eval" / "models"
    (out / "lid").mkdir(parents=True)
    (out / "results.md").write_text("| category | image AUROC (%) |\n|:---|---:|\n| lid | 80.0 |\n| mean | 80.0 |\n")
    report.save_category(out / "lid", test_set, scores, maps, report.Threshold(2.5, "a given value"))
    frame = pd.DataFrame([{"category": "lid", "image_auroc": 80.0}, {"category": "mean", "image_auroc": 80.0}])
    page = report.write_eval_page(out, frame, tmp_path / "models")
    text = page.read_text()
    found = cards_and_lines(text)
    assert [f["kind"] for f in found] == ["card"] * 3 + ["threshold"] + ["card"] * 3, "the line between 3.0 and 2.2"
    cards = [f for f in found if f["kind"] == "card"]
    assert [float(c["data-score"]) for c in cards] == sorted(scores, reverse=True)
    assert [c["data-decision"] for c in cards] == ["anomalous"] * 3 + ["normal"] * 3
    mistakes = {Path(c["data-name"]).name: c["classes"] for c in cards if {"fp", "fn"} & set(c["classes"])}
    assert mistakes.keys() == {"001.png", "004.png"} and "fp" in mistakes["001.png"] and "fn" in mistakes["004.png"]
    (section,) = sections(text)
    assert (section["data-fp"], section["data-fn"], float(section["data-threshold"])) == ("1", "1", 2.5)
    assert "<th>image AUROC (%)</th>" in text and "<td>80.0</td>" in text, "results.md's table on the page"
    assert not NETWORK.search(text)
    for card in cards:
        assert len(card["imgs"]) == 2 and all((out / src).is_file() for src in card["imgs"])
    hole = next(c for c in cards if Path(c["data-name"]).name == "003.png")
    plain, overlay = (np.asarray(Image.open(out / src), dtype=int) for src in hole["imgs"])
    assert plain.shape == (32, 32, 3) and np.abs(plain - overlay).mean() > 5, "the map blended over the image"
    edge, inside = plain[4, 8:24].mean(axis=0), plain[16, 16]
    assert edge[0] > 180 and edge[1] < 100 and edge[2] > 180, f"the mask's outline is magenta: {edge}"
    assert np.abs(inside - 130).max() < 12, "inside the mask the image is untouched"
    table = pd.read_csv(out / "lid" / report.CARDS_NAME, keep_default_na=False)
    assert sorted(table["mistake"]) == ["", "", "", "", "fn", "fp"] and (table["threshold"] == 2.5).all()
    assert "threshold" not in report.render_cards(table, report.Threshold(None, "none")), "no threshold, no line"


def test_thresholds_are_predict_pys_and_say_where_eval_scores_otherwise():
    held, train = torch.arange(1.0, 21.0), torch.arange(0.0, 40.0, 2.0)
    image = {"heldout_scores": held, "train_scores": train, "patch_size": 0}
    found = report.stored_threshold(image)
    assert found.value == pytest.approx(19.81) and found.source.startswith("0.99 quantile of the held-out")
    args = SimpleNamespace(stride=4, density="checkpoint")
    assert report.eval_threshold(image, args).note == ""
    assert "refitted" in report.eval_threshold(image, SimpleNamespace(stride=4, density="torch")).note
    patch = {**image, "patch_size": 32, "score_stride": 16}
    assert "stride 16" in report.eval_threshold(patch, args, "shared").note
    older = report.stored_threshold({"train_scores": train, "patch_size": 0})
    assert older.value == pytest.approx(37.62) and "in-sample" in older.source
    # Two equal members: their averaged standardised scores are each one's, (x - mean) / std of its train scores.
    twins = report.ensemble_threshold([(Path("a"), image), (Path("b"), image)])
    assert twins.value == pytest.approx((19.81 - float(train.mean())) / float(train.std()), rel=1e-6)
    assert report.ensemble_threshold([(Path("a"), image), (Path("b"), {**image, "heldout_scores": held[:5]})]).value \
        is None


def test_prediction_report_is_refused_where_it_would_write_over_inputs(tmp_path, mvtec_root):
    photos = tmp_path / "photos"
    (photos / "report_files").mkdir(parents=True)
    shutil.copy(mvtec_root / "lid" / "test" / "good" / "000.png", photos / "report_files" / "00000.jpg")
    before = (photos / "report_files" / "00000.jpg").read_bytes()
    args = [str(photos), "--checkpoint", str(tmp_path / "never-read.tch"), "--out", str(tmp_path / "p.csv")]
    with pytest.raises(CutPasteError, match="would write over or beside the input .*00000.jpg"):
        predict.main([*args, "--report", str(photos / "report.html")])
    with pytest.raises(CutPasteError, match=r"ending in \.html"):
        predict.main([*args, "--report", str(tmp_path / "report.csv")])
    assert (photos / "report_files" / "00000.jpg").read_bytes() == before and not (tmp_path / "p.csv").exists()


@pytest.fixture(scope="session")
def browser() -> str:
    """The headless Chromium binary; the browser tests name it first, so that they skip before any model work."""
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip("no headless Chromium here (chromium-headless-shell or chromium on PATH): .ci/run installs it "
                    "with apt-get install chromium-headless-shell")
    return found


def chromium(binary: str, page: Path, tmp_path: Path, *flags: str, fragment: str = "") -> str:
    """What Chromium prints for the page (file://, no server) after its script ran: the DOM with --dump-dom."""
    res = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--user-data-dir={tmp_path / 'chromium-profile'}", *flags, page.as_uri() + fragment],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def shown_cards(dom: str) -> list[dict]:
    return [c for c in cards_and_lines(dom) if c["kind"] == "card" and "hidden" not in c]


def check_in_browser(binary: str, page: Path, tmp_path: Path, n_cards: int) -> str:
    """The page's rendered DOM: one card per image, the script ran, 'mistakes' shows exactly the mistakes; and a
    screenshot that is not blank."""
    dom = chromium(binary, page, tmp_path, "--dump-dom")
    assert 'data-ready="1"' in dom, "the page's script ran to its end"
    assert f">{n_cards} of {n_cards} images shown<" in dom
    mistakes_only = chromium(binary, page, tmp_path, "--dump-dom", fragment="#show=mistakes")
    cards = [c for c in cards_and_lines(dom) if c["kind"] == "card"]
    assert sorted(c["data-name"] for c in shown_cards(mistakes_only)) == \
        sorted(c["data-name"] for c in cards if {"fp", "fn"} & set(c["classes"]))
    shot = tmp_path / "shot.png"
    chromium(binary, page, tmp_path, f"--screenshot={shot}", "--window-size=1000,800")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (800, 1000) and pixels.std() > 15, "the screenshot shows something"
    assert not NETWORK.search(page.read_text()) and not NETWORK.search(dom)
    return dom


def test_eval_report_in_a_browser(browser, tmp_path, mvtec_root, lid_checkpoint):
    (tmp_path / "models").mkdir()
    shutil.copy(lid_checkpoint, tmp_path / "models")
    base = ["--data_dir", str(mvtec_root), "--type", "lid", "--model_dir", str(tmp_path / "models"), "--workers", "0"]
    eval_script.main([*base, "--out_dir", str(tmp_path / "quiet"), "--save_plots", "0", "--report", "0"])
    assert not list((tmp_path / "quiet").rglob("report*")), "--report 0 writes no page"
    eval_script.main([*base, "--out_dir", str(tmp_path / "Eval"), "--localization", "gradcam", "--max_heatmaps", "0"])
    page = tmp_path / "Eval" / "models" / "report.html"
    n_test = len(dataset.list_test_items(mvtec_root, "lid"))
    dom = check_in_browser(browser, page, tmp_path, n_test)
    cards = [c for c in cards_and_lines(dom) if c["kind"] == "card"]
    assert sorted(c["data-name"] for c in cards) == sorted(str(it.path) for it in dataset.list_test_items(mvtec_root,
                                                                                                          "lid"))
    expected = density.quantile_threshold(torch.load(lid_checkpoint, weights_only=True)["heldout_scores"],
                                          DEFAULT_QUANTILE)
    (section,) = sections(dom)
    assert float(section["data-threshold"]) == pytest.approx(expected, rel=1e-9), "predict.py's threshold"
    fp = sum(c["data-truth"] == "0" and float(c["data-score"]) > expected for c in cards)
    fn = sum(c["data-truth"] == "1" and float(c["data-score"]) <= expected for c in cards)
    assert (int(section["data-fp"]), int(section["data-fn"])) == (fp, fn)
    assert f">{fp}</b> false positive" in dom and f">{fn}</b> false negative" in dom
    assert all(len(c["imgs"]) == 2 and (page.parent / c["imgs"][1]).is_file() for c in cards), "GradCAM overlays"
    assert 'src="lid/roc.png"' in dom and 'src="lid/score_hist.png"' in dom and "Li et al. Table 1" in dom


def test_predict_report_in_a_browser(browser, tmp_path, mvtec_root, lid_checkpoint):
    images = tmp_path / "images"
    shutil.copytree(mvtec_root / "lid" / "test", images)
    (images / "notes.png").write_text("not an image")
    page = tmp_path / "out" / "report.html"
    results = predict.main([str(images), "--checkpoint", str(lid_checkpoint), "--out", str(tmp_path / "p.csv"),
                            "--report", str(page), "--truth_from_folders", "--device", "cpu", "--workers", "0",
                            "--runtime", "eager"])
    n_scored = len(results) - 1
    dom = check_in_browser(browser, page, tmp_path, n_scored)
    cards = [c for c in cards_and_lines(dom) if c["kind"] == "card"]
    assert sorted(c["data-name"] for c in cards) == sorted(r.path for r in results if r.label != "error")
    threshold = Detector.load(lid_checkpoint, device="cpu", runtime="eager").threshold(DEFAULT_QUANTILE)
    (section,) = sections(dom)
    assert float(section["data-threshold"]) == pytest.approx(threshold, rel=1e-9)
    assert all((c["data-decision"] == "anomalous") == (float(c["data-score"]) > threshold) for c in cards)
    assert all(c["data-truth"] == str(int(Path(c["data-name"]).parent.name != "good")) for c in cards)
    assert re.search(r"Unreadable files \(1\).*notes\.png", dom, re.S), "the unreadable file is listed"
