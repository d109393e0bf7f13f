"""The reproduction grid: its CSV, skip logic and figures."""
import shutil

import pandas as pd
import pytest

import reproduce
from common.errors import CutPasteError
from common.paper import PAPER_TABLE1
from evaluation import evaluate
from reproduction import figures as drawing
from reproduction import grid as grid_runs
from training import loop

TINY = ["--epochs", "3", "--size", "32", "--batch_size", "4", "--workers", "0", "--test_epochs", "2"]


def grid_argv(out_dir, data_dir, *extra):
    return ["--data_dir", str(data_dir), "--type", "lid", "--variants", "normal", "--out_dir", str(out_dir),
            *TINY, "--train_args", "--log_every 1", *extra]


@pytest.fixture(scope="module")
def grid(tmp_path_factory, mvtec_root):
    """A finished grid: variant normal, category lid, seeds 0 and 1, their ensemble, figures."""
    out = tmp_path_factory.mktemp("grid")
    frame = reproduce.main(grid_argv(out / "runs", mvtec_root, "--seeds", "0,1", "--ensemble",
                                     "--figures_dir", str(out / "doc")))
    return out, frame


def test_grid_csv_shape(grid):
    out, frame = grid
    table = pd.read_csv(out / "runs" / "results.csv", dtype={"seed": str})
    assert list(table.columns[:7]) == list(grid_runs.KEY)
    assert len(table) == 3 and sorted(table["seed"]) == ["0", "0+1", "1"]
    assert set(table["backbone"]) == {"resnet18"} and not table["pretrained"].any()
    assert set(table["steps"]) == {3} and set(table["size"]) == {32}
    assert table["image_auroc"].between(0, 100).all()
    single = table[table["models"] == 1]
    assert single["logdir"].map(lambda p: (out / "runs" / "logdirs").as_posix() in p).all()
    ens = table[table["models"] == 2].iloc[0]
    assert ens["single_image_auroc_mean"] == pytest.approx(single["image_auroc"].mean())
    assert len(frame) == 3


def test_figures_written_from_the_csv(grid):
    out, _ = grid
    for name in ("bars_normal.png", "curves_normal.png"):
        assert (out / "doc" / name).stat().st_size > 1000
    assert (out / "doc" / "results.csv").read_text() == (out / "runs" / "results.csv").read_text()
    text = (out / "doc" / "table.md").read_text()
    assert "normal: this implementation" in text and "normal: ensemble of 2" in text
    assert "3 steps, 32 px" in text and "seeds: normal 0, 1" in text


def test_finished_grid_is_skipped(grid, mvtec_root, monkeypatch):
    out, _ = grid
    before = (out / "runs" / "results.csv").read_text()

    def boom(*args, **kwargs):
        raise AssertionError("nothing should run again")

    monkeypatch.setattr(loop, "run", boom)
    monkeypatch.setattr(evaluate, "evaluate_category", boom)
    monkeypatch.setattr(evaluate, "evaluate_ensemble", boom)
    reproduce.main(grid_argv(out / "runs", mvtec_root, "--seeds", "0,1", "--ensemble"))
    assert (out / "runs" / "results.csv").read_text() == before


def test_missing_row_is_evaluated_without_retraining(grid, mvtec_root, tmp_path, monkeypatch):
    out, _ = grid
    runs = tmp_path / "runs"
    shutil.copytree(out / "runs", runs)
    table = pd.read_csv(runs / "results.csv", dtype={"seed": str})
    table[table["seed"] != "1"].to_csv(runs / "results.csv", index=False)
    monkeypatch.setattr(loop, "run", lambda *a, **k: pytest.fail("retrained a finished model"))
    frame = reproduce.main(grid_argv(runs, mvtec_root, "--seeds", "0,1"))
    assert sorted(frame["seed"]) == ["0", "0+1", "1"]


def test_other_settings_in_the_same_folder_are_refused(grid, mvtec_root):
    out, _ = grid
    argv = grid_argv(out / "runs", mvtec_root, "--seeds", "0")
    argv[argv.index("--train_args") + 1] = "--log_every 1 --lr 0.01"
    with pytest.raises(CutPasteError, match=r"other settings \(--lr 0.03 \(asked: 0.01\)"):
        reproduce.main(argv)


def test_bad_grid_options(tmp_path, mvtec_root):
    with pytest.raises(CutPasteError, match="unknown mixup"):
        reproduce.main(grid_argv(tmp_path, mvtec_root, "--variants", "normal,mixup"))
    with pytest.raises(CutPasteError, match="at least two --seeds"):
        reproduce.main(grid_argv(tmp_path, mvtec_root, "--ensemble"))
    with pytest.raises(CutPasteError, match="distinct integers"):
        reproduce.main(grid_argv(tmp_path, mvtec_root, "--seeds", "1,1"))


def write_two_seeds(path, shift=0.0):
    """A grid CSV of variant 3way, bottle and cable, seeds 0 and 1 (image AUROC + `shift`)."""
    rows = [dict(category=c, variant="3way", seed=str(s), backbone="resnet18", pretrained=False, steps=10,
                 size=256, image_auroc=v + shift, models=1)
            for c, vals in (("bottle", (97.0, 99.0)), ("cable", (80.0, 84.0))) for s, v in enumerate(vals)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_table_statistics_and_paper_columns(tmp_path):
    write_two_seeds(tmp_path / "results.csv")
    written = reproduce.main(["--figures_from", str(tmp_path / "results.csv"), "--figures_dir", str(tmp_path / "doc")])
    assert sorted(p.name for p in written) == ["bars_3way.png", "table.md"]
    table = drawing.summary_table(drawing.load_results(tmp_path / "results.csv"),
                                  drawing.read_paper(PAPER_TABLE1)).set_index("category")
    assert table.loc["bottle", "3way: this implementation"] == "98.0 ± 1.4"
    assert table.loc["mean", "3way: this implementation"] == "90.0 ± 2.1"  # per-seed means 88.5 and 91.5
    assert table.loc["bottle", "3way: Li et al. Table 1"] == "98.3"
    assert table.loc["mean", "3way: Li et al. Table 1"] == f"{(98.3 + 80.6) / 2:.1f}"  # over the same categories


def test_each_run_gets_the_arguments_of_its_command_line(tmp_path):
    """A grid's run gets from the grid's own flags, its variant and seed and --train_args (--eval_args) the
    arguments that run_training.py's (eval.py's) parser makes of the equivalent command line, nothing more."""
    import eval as eval_script
    import run_training
    args = reproduce.resolve_args(reproduce.get_args_parser().parse_args(
        ["--preset", "demo", "--out_dir", str(tmp_path), "--lr", "0.01", "--workers", "0", "--density", "torch",
         "--train_args", "--log_every 8 --freeze_resnet 3", "--eval_args", "--stride 8"]))
    name = grid_runs.run_name(args, "scar", 2)
    command = ["--data_dir", "demo_data", "--type", "lid", "--model_dir", str(tmp_path / "models" / name),
               "--log_dir", str(tmp_path / "logdirs" / name), "--variant", "scar", "--seed", "2", "--no-pretrained",
               "--epochs", "300", "--size", "64", "--test_epochs", "25", "--lr", "0.01", "--workers", "0",
               "--log_every", "8", "--freeze_resnet", "3"]
    assert grid_runs.train_args(args, "scar", 2, ["lid"]) == run_training.get_args_parser().parse_args(command)
    expected = eval_script.get_args_parser().parse_args(
        ["--data_dir", "demo_data", "--type", "lid", "--model_dir", str(tmp_path / name), "--out_dir",
         str(tmp_path / "eval"), "--density", "torch", "--save_plots", "0", "--workers", "0", "--head_layer", "1",
         "--stride", "8"])
    assert grid_runs.eval_args(args, tmp_path / name) == expected


def test_a_full_disk_at_the_figures_table_keeps_the_old_one_and_prints_the_new(tmp_path, disk_fills_at, capsys):
    paper, table = drawing.read_paper(PAPER_TABLE1), tmp_path / "doc" / "table.md"
    old = drawing.load_results(write_two_seeds(tmp_path / "old.csv"))
    assert drawing.write_table(old, paper, tmp_path / "old.csv", table) == table
    before = table.read_bytes()
    new = drawing.load_results(write_two_seeds(tmp_path / "new.csv", shift=-10.0))
    with disk_fills_at(64):  # the temporary file stops at 64 bytes
        assert drawing.write_table(new, paper, tmp_path / "new.csv", table) is None
    printed = capsys.readouterr()
    assert "88.0 ± 1.4" in printed.out and "new.csv" in printed.out, "the new table is printed in full"
    assert f"could not write {table}" in printed.err and "the table above is its only copy" in printed.err
    assert table.read_bytes() == before and [p.name for p in table.parent.iterdir()] == ["table.md"]
