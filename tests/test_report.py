"""`binaryconnect report`: results over seeds computed from real run directories (small MNIST runs)."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest

from binaryconnect.cli import main
from binaryconnect.config import recipe_config
from binaryconnect.errors import ConfigError
from binaryconnect.report import format_report, group_runs, read_run, report_dict
from binaryconnect.train import fit
from helpers import quiet

BASE = dict(train_subset=1000, epochs=2, batch_size=100, device="cpu", model_kwargs={"hidden": 32, "depth": 1})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist):
    """Deterministic seeds 0, 1, 2; stochastic seed 0; deterministic seed 0 with 1 epoch; an unfinished copy."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, recipe, kw in [("det-s1", "mnist-deterministic", {"seed": 1}),
                             ("det-s0", "mnist-deterministic", {"seed": 0}),
                             ("det-s2", "mnist-deterministic", {"seed": 2, "checkpoint_every": 7}),
                             ("sto-s0", "mnist-stochastic", {"seed": 0}),
                             ("det-e1", "mnist-deterministic", {"seed": 0, "epochs": 1})]:
        made[name] = fit(recipe_config(recipe, **{**BASE, **kw}), root / name, progress=False, log=quiet, data=mnist)
    shutil.copytree(root / "det-s0", root / "stopped")
    (root / "stopped" / "summary.json").unlink()
    with open(root / "stopped" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "val_')  # a line cut by a crash
    return root, made


def test_groups_seeds_and_computes_mean_and_sample_sd(runs):
    root, made = runs
    read = [read_run(root / n) for n in ("det-s1", "det-s0", "det-s2", "sto-s0", "det-e1", "stopped")]
    groups = group_runs(read)
    assert [g.label for g in groups] == ["mnist-deterministic epochs=2", "mnist-stochastic",
                                         "mnist-deterministic epochs=1"]
    det = groups[0]
    assert [r.config["seed"] for r in det.runs] == [0, 1, 2]  # sorted; checkpoint_every does not split groups
    expected = [100 * made[f"det-s{s}"]["test_error"] for s in (0, 1, 2)]
    assert det.errors == expected
    assert det.mean == pytest.approx(statistics.fmean(expected), abs=1e-12)
    assert det.sd == pytest.approx(statistics.stdev(expected), abs=1e-12)
    assert groups[1].sd is None and len(groups[1].runs) == 1

    text = format_report(read)
    assert f"{det.mean:.2f} ± {det.sd:.2f}" in text and "(one run)" in text
    assert f"s0 {expected[0]:.2f}, s1 {expected[1]:.2f}, s2 {expected[2]:.2f}" in text
    assert "unfinished (not in any mean):" in text and "stopped: 2/2 epochs, best so far" in text
    markdown = format_report(read, markdown=True).splitlines()
    assert markdown[0].startswith("| experiment | n |") and markdown[1] == "|---|---|---|---|---|---|"


def test_cli_report_json_and_errors(runs, capsys, tmp_path):
    root, made = runs
    assert main(["report", str(root / "det-s0"), str(root / "det-s1"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [group] = out["groups"]
    assert group["n"] == 2 and [r["seed"] for r in group["runs"]] == [0, 1]
    assert group["runs"][0]["test_error"] == 100 * made["det-s0"]["test_error"]
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a binaryconnect run directory (no config.json)" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        read_run(tmp_path)


NAMES = ("det-s1", "det-s0", "det-s2", "sto-s0", "det-e1", "stopped")


def _curves_of(run_dir):
    """Epochs, validation error (%) and training loss of a run, read here from metrics.jsonl (the oracle)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.endswith("}"):  # the cut line of the "stopped" copy
            break
        rows.append(json.loads(line))
    return ([r["epoch"] for r in rows], [100 * r["val_error"] for r in rows], [r["train_loss"] for r in rows])


def test_plot_draws_every_runs_validation_error_and_training_loss(runs, tmp_path):
    pytest.importorskip("matplotlib")  # installed with the dev extra, so in CI
    from binaryconnect.plot import plot_curves

    root, _ = runs
    fig = plot_curves([read_run(root / n) for n in NAMES], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    error_axis, loss_axis = fig.axes
    assert error_axis.get_yscale() == loss_axis.get_yscale() == "log"
    drawn_errors = [(list(line.get_xdata()), list(line.get_ydata())) for line in error_axis.lines]
    drawn_losses = [(list(line.get_xdata()), list(line.get_ydata())) for line in loss_axis.lines]
    expected = {n: _curves_of(root / n) for n in NAMES}
    assert len(expected["stopped"][0]) == 2  # unfinished: drawn as far as its readable lines go
    assert sorted(drawn_errors) == sorted((e, v) for e, v, _ in expected.values())
    assert sorted(drawn_losses) == sorted((e, t) for e, _, t in expected.values())
    # one colour per experiment: the four seed-0/1/2 and stopped runs of the 2-epoch deterministic
    # experiment share one, the stochastic run and the 1-epoch run have their own
    def colours(names):
        return {line.get_color() for line, drawn in zip(error_axis.lines, drawn_errors, strict=True)
                if drawn in [expected[n][:2] for n in names]}

    deterministic = colours(["det-s0", "det-s1", "det-s2", "stopped"])
    assert len(deterministic) == 1 and len(colours(["sto-s0"])) == len(colours(["det-e1"])) == 1
    assert len(deterministic | colours(["sto-s0"]) | colours(["det-e1"])) == 3
    assert [line.get_color() for line in loss_axis.lines] == [line.get_color() for line in error_axis.lines]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["mnist-deterministic epochs=2 (4 runs)", "mnist-stochastic (1 run)",
                      "mnist-deterministic epochs=1 (1 run)"]


def test_cli_report_plot_and_its_errors(runs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    root, _ = runs
    dirs = [str(root / n) for n in NAMES]
    assert main(["report", *dirs, "--markdown", "--plot", str(tmp_path / "curves.svg")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| experiment |") and f"training curves written to {tmp_path / 'curves.svg'}" in err
    assert "<svg" in (tmp_path / "curves.svg").read_text()

    (tmp_path / "notes.png").write_text("my notes")  # an existing file: refused before anything, kept
    assert main(["report", *dirs, "--plot", str(tmp_path / "notes.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "notes.png already exists; pass --force to overwrite it" in err
    assert (tmp_path / "notes.png").read_text() == "my notes"
    assert main(["report", *dirs, "--plot", str(tmp_path / "curves.svg"), "--force"]) == 0  # drawn again
    capsys.readouterr()

    assert main(["report", *dirs, "--plot", str(tmp_path / "curves.xyz")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the plot's format from 'curves.xyz'" in err and ".png" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "curves.xyz").exists()

    empty = tmp_path / "empty"  # a run directory whose first epoch has not finished
    empty.mkdir()
    shutil.copy(root / "det-s0" / "config.json", empty / "config.json")
    assert main(["report", str(empty), "--plot", str(tmp_path / "none.png")]) == 2
    assert "no epoch has finished in these runs" in capsys.readouterr().err

    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # matplotlib not installed
    assert main(["report", *dirs, "--plot", str(tmp_path / "again.png")]) == 2
    err = capsys.readouterr().err
    assert '--plot needs matplotlib: python -m pip install -e ".[plot]"' in err and len(err.splitlines()) == 1
    assert not (tmp_path / "again.png").exists()



def test_a_run_named_twice_counts_once(runs, capsys):
    root, made = runs
    twice = [read_run(root / "det-s0"), read_run(root / "det-s0"), read_run(root / "det-s1")]
    assert [len(g.runs) for g in group_runs(twice)] == [2]
    stopped = [read_run(root / "stopped"), read_run(root / "stopped" / ".." / "stopped")]
    assert format_report(stopped).count("2/2 epochs") == 1  # the library lists it once, not only the CLI
    assert main(["report", str(root / "det-s0"), str(root / "det-s0" / ".." / "det-s0"), "--json"]) == 0
    assert [g["n"] for g in json.loads(capsys.readouterr().out)["groups"]] == [1]


def test_plot_errors_come_after_the_table_in_one_line(runs, tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    root, _ = runs
    assert main(["report", str(root / "det-s0"), "--plot", str(tmp_path / "file" / "x.png")]) == 0  # makes folders
    (tmp_path / "blocker").write_text("a file where a folder should be")
    assert main(["report", str(root / "det-s0"), "--plot", str(tmp_path / "blocker" / "x.png")]) == 1  # an OS error
    out, err = capsys.readouterr()
    assert "mnist-deterministic" in out  # the table was printed first
    assert "error: cannot write the plot (" in err and str(tmp_path / "blocker" / "x.png") in err
    assert len(err.strip().splitlines()) == 2  # 'written' (the first call's), then the error

    def broken(self, *args, **kwargs):
        raise RuntimeError("xelatex not found")

    monkeypatch.setattr(Figure, "savefig", broken)
    assert main(["report", str(root / "det-s0"), "--plot", str(tmp_path / "x.pgf")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib could not draw 'x.pgf' as pgf (xelatex not found); try .png, .pdf or .svg" in err
    assert "Traceback" not in err and not (tmp_path / "x.pgf").exists()



def test_damaged_run_files_are_read_up_to_the_damage_or_refused(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "det-s0", run)
    (run / "summary.json").unlink()
    good = (run / "metrics.jsonl").read_text().splitlines()
    for bad in ('[1, 2]', '{"epoch": 3, "val_error": null, "test_error": 0.1, "train_loss": 0.2}',
                '{"epoch": 3, "test_error": 0.1, "train_loss": 0.2}'):
        (run / "metrics.jsonl").write_text("\n".join([good[0], bad, good[1]]) + "\n")
        assert read_run(run).epochs_done == 1  # a line that is not a record ends what is read
    shutil.copy(root / "det-s0" / "summary.json", run / "summary.json")
    summary = json.loads((run / "summary.json").read_text())
    for key, value in (("test_error", None), ("test_error", "1.2"), ("best_epoch", 1.5), ("test_error", float("nan"))):
        (run / "summary.json").write_text(json.dumps({**summary, key: value}))
        with pytest.raises(ConfigError, match="lacks the test error, best epoch or validation error"):
            read_run(run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "config": {**config["config"], "seed": "0"}}))
    with pytest.raises(ConfigError, match="holds no training configuration"):
        read_run(run)


def test_damage_to_what_the_report_only_shows_is_shown_as_unknown_not_a_crash(runs, tmp_path, capsys):
    """A wall time that is NaN or a string, an environment that is not an object, a byte that is not UTF-8
    in metrics.jsonl: the report (table, JSON, plot) still comes out; the metrics are read up to the damage."""
    root, _ = runs
    dirs = []
    for name, wall in (("a", float("nan")), ("b", "12")):
        run = tmp_path / name
        shutil.copytree(root / ("det-s0" if name == "a" else "det-s1"), run)
        summary = json.loads((run / "summary.json").read_text())
        (run / "summary.json").write_text(json.dumps({**summary, "wall_seconds": wall}))
        dirs.append(str(run))
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**config, "environment": "cpu"}))
    stopped = tmp_path / "stopped"
    shutil.copytree(root / "stopped", stopped)
    good = (stopped / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (stopped / "metrics.jsonl").write_bytes(good[0] + b'{"epoch": 2, "lr\xff' + b"\n")
    assert read_run(stopped).epochs_done == 1
    for extra in ([], ["--markdown"]):
        assert main(["report", *dirs, str(stopped), *extra]) == 0
        assert "mnist-deterministic" in capsys.readouterr().out
    assert main(["report", *dirs, str(stopped), "--json"]) == 0
    runs_out = [r for g in json.loads(capsys.readouterr().out)["groups"] for r in g["runs"]]
    assert sorted((Path(r["run"]).name, r["wall_seconds"], r["device"]) for r in runs_out) == [
        ("a", None, None), ("b", None, "cpu")]


def test_plot_of_one_epoch_draws_a_point_on_a_whole_epoch(runs, tmp_path):
    """A line through one point draws nothing: a run of one epoch gets markers, and the axis stays on epoch 1."""
    pytest.importorskip("matplotlib")
    from binaryconnect.plot import plot_curves

    root, _ = runs
    fig = plot_curves([read_run(root / "det-e1")], tmp_path / "one.png")
    error_axis, loss_axis = fig.axes
    assert [line.get_marker() for line in (*error_axis.lines, *loss_axis.lines)] == ["o", "o"]
    assert error_axis.get_xlim() == (0.5, 1.5) and list(error_axis.get_xticks()) == [1]
    fig = plot_curves([read_run(root / "det-s0")], tmp_path / "two.png")
    assert fig.axes[0].lines[0].get_marker() in (None, "None", "")



def test_plot_keeps_zeros_on_a_linear_axis(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from binaryconnect.plot import plot_curves

    root, _ = runs
    run = tmp_path / "perfect"
    shutil.copytree(root / "det-s0", run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["val_error"] = 0.0  # a perfect last epoch (possible on a small validation set)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    error_axis, loss_axis = plot_curves([read_run(run)], tmp_path / "c.png").axes
    assert error_axis.get_yscale() == "linear" and loss_axis.get_yscale() == "log"
    assert list(error_axis.lines[0].get_ydata()) == [100 * r["val_error"] for r in rows]


def _synthetic_run(path, recipe="mnist-deterministic", summary=None, metrics=(), environment=None, **options):
    """A run directory as ``train`` writes it, made here without training: config.json (the recipe's
    configuration with ``options``), summary.json if ``summary`` is given (test errors as fractions),
    metrics.jsonl from ``metrics`` (epoch, validation error, test error) rows."""
    path.mkdir(parents=True)
    config = recipe_config(recipe, **options).to_dict()
    environment = {"device": "cpu", "threads": 2, "torch": "2.x"} if environment is None else environment
    (path / "config.json").write_text(json.dumps({"config": config, "environment": environment}))
    (path / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "val_error": v, "test_error": t, "train_loss": 0.5 / e}) + "\n" for e, v, t in metrics))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps({"best_epoch": 1, "best_val_error": 0.02, **summary}))
    return path


def test_options_that_do_not_define_the_experiment_do_not_split_a_group(tmp_path):
    """Seeds run on another device, from another data folder, with other checkpointing, evaluation batch
    size, determinism, torch.compile (and mode), channels-last or CUDA graphs are one experiment (the
    module's documented list): one group of every run."""
    others = [{"device": "cuda"}, {"data_dir": "/elsewhere"}, {"download": False}, {"checkpoint_every": 7},
              {"checkpoint_seconds": 0}, {"eval_batch_size": 250}, {"deterministic": True}, {"compile": True},
              {"compile": True, "compile_mode": "reduce-overhead"}, {"channels_last": True}, {"cuda_graph": True},
              {"dataset_kwargs": {"cache": False}}, {"dataset_kwargs": {"verify": False}}]  # (the same tensors)
    runs = [read_run(_synthetic_run(tmp_path / "base", seed=0, summary={"test_error": 0.01}))]
    for seed, option in enumerate(others, 1):
        runs.append(read_run(_synthetic_run(tmp_path / f"s{seed}", seed=seed, summary={"test_error": 0.01}, **option)))
    [group] = group_runs(runs)
    assert group.label == "mnist-deterministic" and [r.config["seed"] for r in group.runs] == list(range(14))


def test_a_seed_that_appears_twice_in_a_row_is_pointed_out(tmp_path):
    """Seed 0 on the CPU and on a GPU: one experiment (two runs), which the table counts as two; a note says so."""
    runs = [read_run(_synthetic_run(tmp_path / "cpu0", seed=0, summary={"test_error": 0.01})),
            read_run(_synthetic_run(tmp_path / "gpu0", seed=0, device="cuda", summary={"test_error": 0.02})),
            read_run(_synthetic_run(tmp_path / "cpu1", seed=1, summary={"test_error": 0.03}))]
    text = format_report(runs)
    assert "note: mnist-deterministic: seed 0 appears in 2 runs" in text
    assert "note:" not in format_report(runs[1:])
    assert [g["repeated_seeds"] for g in report_dict(runs)["groups"]] == [[0]]
    assert [g["repeated_seeds"] for g in report_dict(runs[1:])["groups"]] == [[]]


@pytest.mark.parametrize("recipe, option", [
    ("mnist-deterministic", {"binarization": "stochastic"}),  # the same recipe told to binarize otherwise
    ("mnist-float", {"binarization": "deterministic"}),  # mnist-deterministic's options under another recipe name
    ("mnist-deterministic", {"amp": "bf16"}),  # bf16 rounds the activations: another experiment
    ("mnist-deterministic", {"H": 0.5}),
    ("mnist-deterministic", {"lr_start": 3e-3}),
    ("mnist-deterministic", {"model_kwargs": {"hidden": 2048}}),
    ("mnist-deterministic", {"dataset_kwargs": {"preprocess": "center"}}),
    ("mnist-deterministic", {"val_size": 5000}),
])
def test_options_that_define_the_experiment_split_groups(tmp_path, recipe, option):
    """Two seeds of mnist-deterministic and one run that differs in an option of the experiment (or only
    in its recipe's name): two groups, the second labelled by its recipe and, where the recipes agree,
    by the option."""
    runs = [read_run(_synthetic_run(tmp_path / f"a{s}", seed=s, summary={"test_error": 0.01})) for s in (0, 1)]
    runs.append(read_run(_synthetic_run(tmp_path / "b", recipe=recipe, seed=0, summary={"test_error": 0.02},
                                        **option)))
    groups = group_runs(runs)
    assert [len(g.runs) for g in groups] == [2, 1]
    assert groups[1].label.startswith(recipe) and groups[1].errors == [2.0]
    if recipe == "mnist-deterministic":  # same label: the option that differs is named in both
        [name] = option
        assert f" {name}=" in groups[0].label and f" {name}=" in groups[1].label
    else:
        assert [g.label for g in groups] == ["mnist-deterministic", "mnist-float"]


def test_without_a_recipe_the_label_is_model_and_binarization(tmp_path):
    """Runs configured without a recipe (recipe_config(None, ...)) are labelled by model and binarization."""
    runs = [read_run(_synthetic_run(tmp_path / b, recipe=None, binarization=b, summary={"test_error": 0.01}))
            for b in ("deterministic", "stochastic")]
    assert [g.label for g in group_runs(runs)] == ["mlp deterministic", "mlp stochastic"]


def test_seeds_are_ordered_by_number_not_by_directory_name(tmp_path):
    """Within a group the runs are in seed order (10 after 2), whatever the directories are called."""
    for name, seed, error in (("a", 10, 0.03), ("b", 2, 0.02), ("c", 1, 0.01)):
        _synthetic_run(tmp_path / name, seed=seed, summary={"test_error": error})
    runs = [read_run(tmp_path / n) for n in ("a", "b", "c")]
    [group] = group_runs(runs)
    assert [r.config["seed"] for r in group.runs] == [1, 2, 10]
    assert group.errors == pytest.approx([1.0, 2.0, 3.0])
    assert "s1 1.00, s2 2.00, s10 3.00" in format_report(runs)


def test_mean_and_sample_sd_against_hand_computed_values(tmp_path):
    """Test errors 1.25%, 1.50%, 1.10%: mean 1.2833, sample standard deviation (n - 1) 0.2021 (the
    population one would be 0.1650), printed to two decimals."""
    runs = [read_run(_synthetic_run(tmp_path / f"s{s}", seed=s, summary={"test_error": e}))
            for s, e in enumerate((0.0125, 0.0150, 0.0110))]
    [group] = group_runs(runs)
    errors = [1.25, 1.50, 1.10]
    mean = sum(errors) / 3
    sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / 2)
    assert group.mean == pytest.approx(mean) and group.sd == pytest.approx(sd) and round(sd, 4) == 0.2021
    assert "| mnist-deterministic | 3 | s0 1.25, s1 1.50, s2 1.10 | 1.28 ± 0.20 |" in format_report(runs, markdown=True)


def test_json_report_holds_every_number_of_the_table(tmp_path):
    """``report --json``: per group n, mean, sample sd (None for one run), and per run its seed, test and
    best validation errors in %, best epoch, wall time and environment; unfinished runs with the epochs
    done and the epochs asked for, each once."""
    _synthetic_run(tmp_path / "s0", seed=0, environment={"device": "cuda:0", "threads": 4, "torch": "2.9"},
                   summary={"test_error": 0.011, "best_val_error": 0.013, "best_epoch": 7, "wall_seconds": 12.5})
    _synthetic_run(tmp_path / "s1", seed=1, summary={"test_error": 0.015, "best_val_error": 0.012, "best_epoch": 9})
    _synthetic_run(tmp_path / "sto", binarization="stochastic", seed=0, summary={"test_error": 0.02})
    _synthetic_run(tmp_path / "stopped", seed=2, epochs=5, metrics=[(1, 0.1, 0.11), (2, 0.05, 0.06)])
    runs = [read_run(tmp_path / n) for n in ("s0", "s1", "sto", "stopped", "stopped")]
    data = report_dict(runs)
    first, second = data["groups"]
    assert (first["n"], second["n"], second["sd_test_error"]) == (2, 1, None)
    assert first["mean_test_error"] == pytest.approx(1.3)
    assert first["sd_test_error"] == pytest.approx(math.sqrt(2 * 0.2**2))
    run = first["runs"][0]
    assert run["run"] == str(tmp_path / "s0") and run["seed"] == 0 and run["best_epoch"] == 7
    assert run["test_error"] == pytest.approx(1.1) and run["best_val_error"] == pytest.approx(1.3)
    assert (run["wall_seconds"], run["device"], run["threads"], run["torch"]) == (12.5, "cuda:0", 4, "2.9")
    assert first["runs"][1]["wall_seconds"] is None
    assert data["unfinished"] == [{"run": str(tmp_path / "stopped"), "epochs_done": 2, "epochs": 5,
                                   "epochs_at_most": False, "diverged": None}]


def test_unfinished_run_shows_progress_and_the_best_validation_epoch_so_far(tmp_path):
    """An unfinished run: epochs done of those asked for, and the test error of the epoch with the lowest
    validation error so far (the later epoch on a tie), not the lowest test error."""
    _synthetic_run(tmp_path / "done", seed=0, summary={"test_error": 0.01})
    _synthetic_run(tmp_path / "stopped", seed=1, epochs=5,
                   metrics=[(1, 0.10, 0.03), (2, 0.05, 0.09), (3, 0.05, 0.08)])
    text = format_report([read_run(tmp_path / "done"), read_run(tmp_path / "stopped")])
    assert text.endswith(f"\n  {tmp_path / 'stopped'}: 3/5 epochs, best so far 8.00% at epoch 3")


def test_an_unfinished_budgeted_run_counts_its_epochs_against_the_cap_until_planned(tmp_path):
    """A run with a time budget stopped in its first epoch has no plan yet: its --epochs is only an upper
    bound ("at most"); once planned, config.json holds the planned number, shown as any run's."""
    run = _synthetic_run(tmp_path / "first", seed=0, epochs=8, time_budget=60.0)
    assert format_report([read_run(run)]).endswith(f"\n  {run}: 0/at most 8 epochs")
    [entry] = report_dict([read_run(run)])["unfinished"]
    assert (entry["epochs"], entry["epochs_at_most"]) == (8, True)  # --json says it too
    info = json.loads((run / "config.json").read_text())
    info["config"]["epochs"], info["plan"] = 3, {"epochs": 3, "cap": 8}
    (run / "config.json").write_text(json.dumps(info))
    record = {"epoch": 1, "val_error": 0.1, "test_error": 0.2, "train_loss": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    assert format_report([read_run(run)]).endswith(f"\n  {run}: 1/3 epochs, best so far 20.00% at epoch 1")
    [entry] = report_dict([read_run(run)])["unfinished"]
    assert (entry["epochs"], entry["epochs_at_most"]) == (3, False)


@pytest.mark.parametrize("marker, shown, data", [
    ({"epoch": 3, "step": 41, "loss": "nan", "message": "loss became nan ..."}, "; diverged at epoch 3, step 41 "
     "(loss nan)", {"epoch": 3, "step": 41, "loss": "nan"}),
    ({"epoch": 2, "step": 7}, "; diverged at epoch 2, step 7", {"epoch": 2, "step": 7}),
    ("{not json", "; diverged", {}),  # damaged: it still says the run diverged
    ({"epoch": True, "step": 7}, "; diverged", {}),
])
def test_a_run_that_diverged_is_listed_as_diverged_where_it_did(tmp_path, marker, shown, data):
    """train writes diverged.json when the loss becomes NaN/Inf: the unfinished run's line says where, and
    so does --json; a run without that file is not said to have diverged."""
    run = _synthetic_run(tmp_path / "nan", seed=0, epochs=5, metrics=[(1, 0.1, 0.11), (2, 0.05, 0.06)])
    (run / "diverged.json").write_text(marker if isinstance(marker, str) else json.dumps(marker))
    assert format_report([read_run(run)]).endswith(f"\n  {run}: 2/5 epochs, best so far 6.00% at epoch 2{shown}")
    assert report_dict([read_run(run)])["unfinished"][0]["diverged"] == data
    (run / "diverged.json").unlink()
    assert format_report([read_run(run)]).endswith(f"\n  {run}: 2/5 epochs, best so far 6.00% at epoch 2")


@pytest.mark.parametrize("seconds, shown", [
    ([42.2], "42 s"), ([100.4, 250.6], "100-251 s"), ([99.6, 100.4], "100 s"), ([None, 61.0], "61 s"), ([None], "?")])
def test_wall_time_column_is_the_range_over_seeds(tmp_path, seconds, shown):
    """The wall time per run: one number when the seeds' times round alike, else the range min-max; runs
    without a recorded time are left out ("?" if none has one)."""
    runs = []
    for seed, s in enumerate(seconds):
        summary = {"test_error": 0.01} if s is None else {"test_error": 0.01, "wall_seconds": s}
        runs.append(read_run(_synthetic_run(tmp_path / f"s{seed}", seed=seed, summary=summary)))
    row = format_report(runs, markdown=True).splitlines()[2]
    assert row.endswith(f"| {shown} |")


@pytest.mark.parametrize("key, value", [("best_val_error", None), ("best_val_error", "0.1"), ("test_error", True)])
def test_a_summary_without_numeric_errors_is_refused(tmp_path, key, value):
    """summary.json must hold the validation error as a number too, and a boolean is not a number."""
    run = _synthetic_run(tmp_path / "r", summary={"test_error": 0.01, key: value})
    with pytest.raises(ConfigError, match="lacks the test error, best epoch or validation error"):
        read_run(run)


def test_double_dash_ends_the_options_of_report(tmp_path, monkeypatch, capsys):
    """``binaryconnect report -- -odd-name``: ``--`` ends the options as in any command (only sweep gives
    what follows it to its train commands)."""
    monkeypatch.chdir(tmp_path)
    _synthetic_run(tmp_path / "-odd-name", seed=3, summary={"test_error": 0.0125})
    assert main(["report", "--json", "--", "-odd-name"]) == 0
    [group] = json.loads(capsys.readouterr().out)["groups"]
    assert [r["seed"] for r in group["runs"]] == [3]


def test_files_among_the_paths_are_skipped_with_a_warning(runs, tmp_path, capsys):
    """`report OUT/*` over a sweep's folder also names the runs' .log files: they are skipped with one warning
    line, the runs reported; only files is an error; a missing path is still an error."""
    root, _ = runs
    log = tmp_path / "det-s0.log"
    log.write_text("started\n")
    with pytest.warns(UserWarning, match=r"^skipped 1 file given as run directories \(det-s0.log\)$"):
        assert main(["report", str(root / "det-s0"), str(log), "--json"]) == 0
    assert [g["n"] for g in json.loads(capsys.readouterr().out)["groups"]] == [1]
    assert main(["report", str(log)]) == 2
    assert "no run directories among the paths given" in capsys.readouterr().err
    starting = tmp_path / "starting"  # a start killed before it wrote anything: its claim file only
    starting.mkdir()
    (starting / ".binaryconnect-starting").touch()
    with pytest.warns(UserWarning, match=r"^skipped 1 run directory with nothing written yet \(starting\)$"):
        assert main(["report", str(root / "det-s0"), str(starting), "--json"]) == 0
    capsys.readouterr()
    assert main(["report", str(root / "det-s0"), str(tmp_path / "missing")]) == 2
    assert "is not a binaryconnect run directory" in capsys.readouterr().err


def test_evaluate_of_a_packed_file_points_at_predict(tmp_path, capsys):
    (tmp_path / "m.bcnn").write_bytes(b"\0" * 16)
    assert main(["evaluate", str(tmp_path / "m.bcnn")]) == 2
    assert f"{tmp_path / 'm.bcnn'} is a packed model: `binaryconnect predict" in capsys.readouterr().err
