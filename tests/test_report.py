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
