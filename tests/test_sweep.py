"""``binaryconnect sweep``: runs side by side, the report, skipping and resuming, the deadline, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from binaryconnect import sweep
from binaryconnect.cli import main
from helpers import assert_one_line_error

TINY = ["--train-subset", "500", "--hidden", "16", "--depth", "1", "--device", "cpu"]


def _cli(*argv, data_root):
    env = {**os.environ, "BINARYCONNECT_DATA": str(data_root)}
    return [sys.executable, "-m", "binaryconnect.cli", *argv], env


def test_sweep_runs_every_recipe_and_seed_then_reports_and_a_repeat_skips(tmp_path, data_root, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "mnist-float", "mnist-deterministic", "--seeds", "0,1", "-j", "2", "-o", str(out),
            "--markdown", "--", "--data-dir", str(data_root), "--epochs", "2", *TINY]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for recipe in ("mnist-float", "mnist-deterministic"):
        for seed in (0, 1):
            summary = json.loads((out / f"{recipe}-s{seed}" / "summary.json").read_text())
            assert (summary["recipe"], summary["seed"], summary["epochs"]) == (recipe, seed, 2)
            assert (out / f"{recipe}-s{seed}.log").read_text().count("epoch ") >= 2
        assert f"| {recipe} | 2 | s0 " in text  # the report's row: both seeds in one group
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}

    assert main(argv) == 0  # everything finished: nothing runs again
    text = capsys.readouterr().out
    assert text.count("already finished, skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps


def test_sigint_stops_the_sweep_with_checkpoints_and_a_repeat_resumes(tmp_path, data_root):
    """Ctrl-C on the sweep reaches each run once: it checkpoints and stops; the same command resumes it."""
    out = tmp_path / "sweep"
    argv, env = _cli("sweep", "mnist-deterministic", "--seeds", "4", "-o", str(out), "--", "--epochs", "400",
                     *TINY, data_root=data_root)
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "mnist-deterministic-s4" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, (stdout, stderr)
    assert "mnist-deterministic-s4: stopped" in stdout and "repeat the same sweep command" in stderr
    run = out / "mnist-deterministic-s4"
    assert (run / "checkpoint.safetensors").is_file() and not (run / "summary.json").exists()
    done = len(metrics.read_text().splitlines())
    assert done < 400

    argv, env = _cli("sweep", "mnist-deterministic", "--seeds", "4", "-o", str(out), "--", "--epochs", "400",
                     *TINY, data_root=data_root)
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "mnist-deterministic-s4: resumed" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 400 and len(metrics.read_text().splitlines()) == 400


def test_deadline_stops_the_running_and_starts_no_more(tmp_path, monkeypatch):
    """With one slot and two jobs, the deadline interrupts the first (SIGINT) and never starts the second."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    jobs = sweep.plan(["a", "b"], [0], tmp_path)
    t0 = time.monotonic()
    sweep.run_jobs(jobs, [], slots=1, deadline=1.0, log=lambda *a: None, poll=0.05)
    assert time.monotonic() - t0 < 30
    assert [j.state for j in jobs] == ["stopped", "not started"]
    assert jobs[0].returncode in (130, -signal.SIGINT)


def test_a_run_that_fails_while_the_sweep_stops_is_failed_not_stopped(tmp_path, monkeypatch):
    """A run that exits with an error (3: diverged) after the deadline's SIGINT has no checkpoint of its
    stop: it is "failed", not "stopped" (which tells the user a repeat resumes it)."""
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, lambda *a: sys.exit(3))\n"
             "time.sleep(60)\n")
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", child])
    jobs = sweep.plan(["a"], [0], tmp_path)
    sweep.run_jobs(jobs, [], slots=1, deadline=1.0, log=lambda *a: None, poll=0.05)
    assert [(j.state, j.returncode) for j in jobs] == [("failed", 3)]


def test_a_failing_run_is_reported_with_its_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "train_command", lambda job, args: [sys.executable, "-c", "raise SystemExit(3)"])
    jobs = sweep.run_jobs(sweep.plan(["a"], [0, 1], tmp_path), [], slots=2, log=print, poll=0.05)
    assert [(j.state, j.returncode) for j in jobs] == [("failed", 3), ("failed", 3)]
    assert f"exit code 3, log {tmp_path / 'a-s0.log'}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "mnist-nope", "--seeds", "0"], "unknown recipe 'mnist-nope'"),
        (["sweep", "mnist-float", "--seeds", "0,0"], "expected distinct comma-separated seeds"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--seed", "3"], "--seed after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "-ox"], "--out after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--se", "1"], "--seed after `--`"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--epochs", "0"], "argument --epochs: expected a positive"),
        (["sweep", "mnist-float", "--seeds", "0", "--", "--compile-mode", "default", "--amp", "fp8"],
         "argument --amp: invalid choice"),
    ],
)
def test_bad_sweep_input_gives_one_clear_line_and_writes_nothing(argv, message, tmp_path, capsys):
    assert_one_line_error([*argv[:2], "-o", str(tmp_path / "s"), *argv[2:]], message, capsys)
    assert not (tmp_path / "s").exists()



def test_a_repeated_sweep_must_ask_for_the_runs_it_finds_and_more_epochs_resume_them(tmp_path, data_root, capsys):
    out = tmp_path / "sweep"
    base = ["sweep", "mnist-float", "--seeds", "0", "-o", str(out), "--", "--data-dir", str(data_root), *TINY]
    assert main([*base, "--epochs", "1"]) == 0
    assert main([*base, "--epochs", "2"]) == 0  # more epochs: the finished run is resumed, not skipped
    capsys.readouterr()
    summary = json.loads((out / "mnist-float-s0" / "summary.json").read_text())
    assert summary["epochs"] == 2 and len((out / "mnist-float-s0" / "metrics.jsonl").read_text().splitlines()) == 2
    before = (out / "mnist-float-s0" / "model.safetensors").read_bytes()
    changed = [*base[:-len(TINY)], "--train-subset", "500", "--hidden", "32", "--depth", "1", "--device", "cpu",
               "--epochs", "2"]
    assert_one_line_error(changed, "mnist-float-s0 holds a run with other options: model_kwargs (run: {", capsys)
    assert_one_line_error([*base, "--epochs", "1"], "has trained 2 epochs; ask for at least that many", capsys)
    assert (out / "mnist-float-s0" / "model.safetensors").read_bytes() == before  # nothing ran


@pytest.mark.parametrize("argv, message", [
    (["sweep", "mnist-float", "mnist-float", "--seeds", "0"], "a recipe is named twice: mnist-float mnist-float"),
    (["sweep", "mnist-float", "--seeds", "0", "--", "--device", "cuda:7"], "device 'cuda:7' asked for"),
    (["sweep", "mnist-float", "--seeds", "0", "--", "--dataset-option", "foo=1"], "dataset 'mnist' has no option"),
])
def test_sweep_checks_what_every_run_would_refuse_before_starting_any(argv, message, tmp_path, capsys):
    cut = argv.index("--seeds") + 2
    assert_one_line_error([*argv[:cut], "-o", str(tmp_path / "s"), *argv[cut:]], message, capsys)
    assert not (tmp_path / "s").exists()
