"""`binaryconnect report`: results over seeds computed from real run directories (small MNIST runs)."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

from binaryconnect.cli import main
from binaryconnect.config import recipe_config
from binaryconnect.errors import ConfigError
from binaryconnect.report import format_report, group_runs, read_run
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
    legend = [t.get_text() for t in error_axis.get_legend().get_texts()]
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
    assert main(["report", str(root / "det-s0"), "--plot", str(tmp_path / "blocker" / "x.png")]) == 2
    out, err = capsys.readouterr()
    assert "mnist-deterministic" in out  # the table was printed first
    assert "cannot write the plot to" in err and len(err.strip().splitlines()) == 2  # 'written', then the error

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
