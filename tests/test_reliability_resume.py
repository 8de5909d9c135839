"""Reliability of training runs: exact resume after SIGKILL, clean stop on SIGTERM/SIGINT, a second Ctrl-C
during the save, and resume refusing a mismatched configuration or dataset (README, "Reliability").

The crash tests run the real command line in subprocesses on real MNIST (2000 training images, a 64-unit
MLP, 3 epochs of 20 steps, a checkpoint every 4 steps) with one CPU thread, and compare the resumed run
with an uninterrupted run of the same seed: the best-model files must be byte-identical and every tensor
of the final checkpoint (latent weights, batch-norm statistics, Adam moments, generator states) equal.
A kill is sent as soon as a mid-epoch checkpoint is on disk (polled, not timed): the child runs at a lower
priority so the poller sees each checkpoint long before the run could end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from binaryconnect.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_tensors, read_checkpoint_state
from binaryconnect.cli import main
from binaryconnect.config import recipe_config
from binaryconnect.errors import CheckpointError, ConfigError, TrainingInterrupted
from binaryconnect.train import fit, resume
from helpers import assert_one_line_error, needs_cuda
from helpers import quiet as _quiet
from helpers import small_config as _small

SMALL = ["--train-subset", "2000", "--hidden", "64", "--epochs", "3", "--batch-size", "100", "--device", "cpu",
         "--no-progress", "--checkpoint-every", "4"]
STEPS_PER_EPOCH = 20


def _env(data_root: Path) -> dict:
    # one thread: results do not depend on how a contended machine schedules two, and it is faster there
    return {**os.environ, "BINARYCONNECT_DATA": str(data_root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "binaryconnect.cli", "train", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))


def _finish(args: list[str], env: dict, log: Path) -> int:
    proc = _start(args, env, log)
    return proc.wait(timeout=300)


def _wait_for_checkpoint(proc: subprocess.Popen, path: Path, condition, log: Path, timeout: float = 300) -> dict:
    """Poll ``path`` until its state satisfies ``condition``; fail if the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the awaited checkpoint:\n{log.read_text()}")
        try:
            state = read_checkpoint_state(path)
        except CheckpointError:  # not written yet
            state = None
        if state is not None and condition(state):
            return state
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no checkpoint satisfying the condition within {timeout}s")


def _assert_same_run(run: Path, reference: Path) -> None:
    """``run`` ended exactly as ``reference``: model bytes, every checkpoint tensor, metrics, summary."""
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    got, got_state = load_checkpoint(run / CHECKPOINT_NAME)
    want, want_state = load_checkpoint(reference / CHECKPOINT_NAME)
    assert sorted(got) == sorted(want)
    assert any(k.startswith("optimizer.") for k in want) and any(k.startswith("rng.") for k in want)
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"tensors differ after resume: {different}"
    assert (got_state["epoch"], got_state["global_step"]) == (want_state["epoch"], want_state["global_step"])

    def metrics(path):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert metrics(run) == metrics(reference)
    keep = ("best_epoch", "best_val_error", "test_error", "epochs", "seed")
    got_summary = json.loads((run / "summary.json").read_text())
    want_summary = json.loads((reference / "summary.json").read_text())
    assert {k: got_summary[k] for k in keep} == {k: want_summary[k] for k in keep}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist) -> dict[str, Path]:
    """One uninterrupted run per binarization, in this process with one thread and the configuration the
    command line builds from ``SMALL``: the reference every interrupted run must match bit for bit."""
    runs = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for binarization in ("deterministic", "stochastic"):
            config = recipe_config(f"mnist-{binarization}", train_subset=2000, model_kwargs={"hidden": 64},
                                   epochs=3, batch_size=100, device="cpu", checkpoint_every=4)
            runs[binarization] = tmp_path_factory.mktemp("reference") / binarization
            fit(config, runs[binarization], progress=False, log=_quiet, data=mnist)
    finally:
        torch.set_num_threads(before)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("binarization", ["deterministic", "stochastic"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, data_root, uninterrupted, binarization):
    env, run, log = _env(data_root), tmp_path / "run", tmp_path / "log.txt"
    proc = _start([f"mnist-{binarization}", *SMALL, "-o", str(run)], env, log)
    _wait_for_checkpoint(proc, run / CHECKPOINT_NAME, lambda s: s["step"] > 0, log)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = read_checkpoint_state(run / CHECKPOINT_NAME)
    assert 0 < killed_at["step"] < STEPS_PER_EPOCH, "the kill must land in the middle of an epoch"
    assert not (run / "summary.json").exists()

    assert _finish(["--resume", str(run), "--no-progress"], env, log) == 0, log.read_text()
    assert f"resuming at epoch {killed_at['epoch'] + 1}, step {killed_at['step']}" in log.read_text()
    _assert_same_run(run, uninterrupted[binarization])


@pytest.mark.slow
def test_sigterm_and_sigint_stop_cleanly_and_resume_exactly(tmp_path, data_root, uninterrupted):
    env, run, log = _env(data_root), tmp_path / "run", tmp_path / "log.txt"
    path = run / CHECKPOINT_NAME

    # SIGTERM mid-epoch: the step finishes, a checkpoint is written, exit code 143
    proc = _start(["mnist-deterministic", *SMALL, "-o", str(run)], env, log)
    seen = _wait_for_checkpoint(proc, path, lambda s: s["step"] > 0, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()
    stopped = read_checkpoint_state(path)
    assert stopped["global_step"] >= seen["global_step"]
    assert f"stopped by SIGTERM at epoch {stopped['epoch'] + 1}, step {stopped['step']}" in log.read_text() \
        or f"stopped by SIGTERM after epoch {stopped['epoch']}" in log.read_text()
    assert not (run / "summary.json").exists()

    # the resumed run gets Ctrl-C (SIGINT): exit code 130, and it too can be resumed
    proc = _start(["--resume", str(run), "--no-progress"], env, log)
    _wait_for_checkpoint(proc, path, lambda s: s["global_step"] > stopped["global_step"], log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert "stopped by SIGINT" in log.read_text()
    assert "Traceback" not in log.read_text()

    assert _finish(["--resume", str(run), "--no-progress"], env, log) == 0, log.read_text()
    _assert_same_run(run, uninterrupted["deterministic"])
    resumes = json.loads((run / "config.json").read_text())["resumes"]
    assert len(resumes) == 2 and all(r["changed"] == {} for r in resumes)


# --- in-process tests (one thread, like the subprocesses) ---


def _call_hook(data, at: int, action):
    """``data`` whose training-batch transform calls ``action()`` on its ``at``-th call (the batch of
    global step ``at``) and returns the batch unchanged: a way to act at an exact step of ``fit``."""
    calls = {"n": 0}

    def transform(x, generator):
        calls["n"] += 1
        if calls["n"] == at:
            action()
        return x

    return dataclasses.replace(data, train_transform=transform)


def _second_signal_during_the_save(monkeypatch, signum):
    """``(first_ctrl_c, second)``: ``first_ctrl_c()`` sends SIGINT; the checkpoint write it causes then gets
    ``signum`` between its temporary file's fsync and its rename (``second["sent"]`` says it was sent)."""
    from binaryconnect import checkpoint as checkpoint_module

    real_fsync, second = os.fsync, {"armed": False, "sent": False}

    def fsync_then_signal(fd):
        real_fsync(fd)
        if second["armed"] and not second["sent"]:
            second["sent"] = True
            os.kill(os.getpid(), signum)

    def first_ctrl_c():
        second["armed"] = True
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(checkpoint_module.os, "fsync", fsync_then_signal)
    return first_ctrl_c, second

def test_second_ctrl_c_during_the_save_does_not_corrupt_it(tmp_path, mnist, monkeypatch, capfd, one_thread):
    config = _small(binarization="stochastic")
    reference = tmp_path / "reference"
    fit(config, reference, progress=False, log=_quiet, data=mnist)

    # first Ctrl-C during step 7; the second one arrives in the middle of writing the checkpoint, between
    # the temporary file's fsync and its rename
    first_ctrl_c, second = _second_signal_during_the_save(monkeypatch, signal.SIGINT)
    run = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at epoch 1, step 7") as info:
        fit(config, run, progress=False, log=_quiet, data=_call_hook(mnist, 7, first_ctrl_c))
    monkeypatch.undo()
    assert info.value.exit_code == 130
    assert second["sent"]
    err = capfd.readouterr().err
    assert "SIGINT received: stopping after this step" in err and "already stopping" in err
    assert not list(run.glob(".*.tmp"))
    _, state = load_checkpoint(run / CHECKPOINT_NAME)  # complete and loadable
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 7, 7)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the caller's handler is back

    resume(run, progress=False, log=_quiet, data=mnist)
    _assert_same_run(run, reference)


def test_resume_refuses_a_different_architecture_binarization_dataset_or_seed(tmp_path, mnist, one_thread):
    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    before = (run / CHECKPOINT_NAME).read_bytes()
    refusals = [
        ({"binarization": "stochastic"}, r"binarization \(run: 'deterministic', asked: 'stochastic'\)"),
        ({"model_kwargs": {"hidden": 128}}, r"model_kwargs \(run: \{.*'hidden': 64.*asked: \{.*'hidden': 128"),
        ({"model": "cnn"}, r"model \(run: 'mlp', asked: 'cnn'\)"),
        ({"dataset": "cifar10"}, r"dataset \(run: 'mnist', asked: 'cifar10'\)"),
        ({"train_subset": 3000}, r"train_subset \(run: 2000, asked: 3000\)"),
        ({"seed": 1}, r"seed \(run: 0, asked: 1\)"),
        ({"H": 0.5, "lr_start": 1e-2}, r"H \(run: 1.0, asked: 0.5\); lr_start \(run: 0.001, asked: 0.01\)"),
    ]
    for overrides, message in refusals:
        with pytest.raises(ConfigError, match=rf"cannot resume {run}: the run was started with a different "
                                              rf"{message}.*only epochs, device"):
            resume(run, progress=False, log=_quiet, data=mnist, **overrides)

    # the same options but other training data (labels shifted) for one more epoch: refused by the data
    # fingerprint (without more epochs the finished run has nothing to train: "nothing to do", data unused)
    shifted = dataclasses.replace(mnist, train_y=(mnist.train_y + 1) % 10)
    with pytest.raises(CheckpointError, match="training data differ from those the run was started with"):
        resume(run, progress=False, log=_quiet, data=shifted, epochs=2)
    assert (run / CHECKPOINT_NAME).read_bytes() == before  # a refused resume changes nothing


def test_allowed_changes_are_applied_and_recorded(tmp_path, mnist, one_thread, capsys):
    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    summary = resume(run, progress=False, log=print, data=mnist, epochs=3, checkpoint_every=7)
    assert "resuming at epoch 2, step 0 (global step 20); changed: epochs 1 -> 3, checkpoint_every None -> 7" \
        in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["epochs"] == 3 and saved["config"]["checkpoint_every"] == 7
    assert saved["resumes"][-1]["changed"] == {"epochs": [1, 3], "checkpoint_every": [None, 7]}
    assert (saved["resumes"][-1]["epoch"], saved["resumes"][-1]["step"]) == (1, 0)
    assert summary["epochs"] == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["global_step"] == 3 * STEPS_PER_EPOCH

    # fewer epochs than the run has already trained cannot be asked for
    capsys.readouterr()
    with pytest.raises(ConfigError, match="already trained 3 epochs; ask for at least that many"):
        resume(run, progress=False, log=print, data=mnist, epochs=2)
    assert "resuming" not in capsys.readouterr().out  # a refused resume does not announce itself first


def test_resuming_a_finished_run_changes_nothing(tmp_path, mnist, one_thread, capsys):
    run = tmp_path / "run"
    done = fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in run.iterdir()}
    assert resume(run, progress=False, log=print, data=mnist) == done
    out = capsys.readouterr().out
    assert f"{run} already finished its 1 epochs" in out and "nothing to do; pass a larger --epochs" in out
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in run.iterdir()} == before
    # without its summary (a crash after the last checkpoint) the run is completed again, as before
    (run / "summary.json").unlink()
    again = resume(run, progress=False, log=_quiet, data=mnist)
    assert again["test_error"] == done["test_error"] and (run / "summary.json").is_file()


def test_cli_resume_can_turn_speed_options_off(tmp_path, mnist, one_thread, data_root, monkeypatch):
    # an option left out keeps the run's value; --no-OPTION turns a speed option of the run off
    monkeypatch.setenv("BINARYCONNECT_DATA", str(data_root))
    run = tmp_path / "run"
    fit(_small(epochs=1, data_dir=None, channels_last=True, deterministic=True), run, progress=False, log=_quiet,
        data=mnist)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-channels-last", "--no-progress", "-q"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["resumes"][-1]["changed"] == {"epochs": [1, 2], "channels_last": [True, False]}
    assert saved["config"]["deterministic"] is True


def test_cli_resume_reports_a_mismatch_in_one_line(tmp_path, mnist, capsys, one_thread):
    run = tmp_path / "run"
    fit(_small(epochs=1, data_dir=None), run, progress=False, log=_quiet, data=mnist)
    assert main(["train", "--resume", str(run), "--hidden", "32", "--binarization", "stochastic"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"binaryconnect: error: cannot resume {run}: ")
    assert "binarization (run: 'deterministic', asked: 'stochastic')" in err and "'hidden': 32" in err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'} does not exist (or is not a directory)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint.safetensors: nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("seconds, checkpointed_epoch", [pytest.param(0, 2, id="0"),
                                                       pytest.param(1e9, 0, id="1e9")])
def test_checkpoint_seconds_skips_epoch_end_checkpoints_and_resume_stays_exact(tmp_path, mnist, one_thread,
                                                                                seconds, checkpointed_epoch):
    # --checkpoint-seconds S: an epoch's end writes the checkpoint only S seconds after the last one. A run
    # that crashes after epoch 3 is logged (before its checkpoint) left, with S = 0 (every epoch), the
    # checkpoint of epoch 2; with a huge S, only the one of its start. Either way resuming ends exactly
    # where an uninterrupted run ends, and the last epoch always checkpoints.
    whole = fit(_small(epochs=3), tmp_path / "whole", progress=False, log=_quiet, data=mnist)
    run = tmp_path / "run"

    def crash_after_epoch_3(line):
        if line.startswith("epoch    3/"):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        fit(_small(epochs=3, checkpoint_seconds=seconds), run, progress=False, log=crash_after_epoch_3, data=mnist)
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["epoch"] == checkpointed_epoch
    # the best-model file is written with the checkpoints, not at each better epoch, and on the way out of
    # a failed run: the crash left the best model of the three finished epochs, the uninterrupted run's
    written, expected_best = load_tensors(run / "model.safetensors")[0], load_tensors(tmp_path / "whole" /
                                                                                     "model.safetensors")[0]
    assert written.keys() == expected_best.keys()
    assert all(torch.equal(written[k], expected_best[k]) for k in written)
    summary = resume(run, progress=False, log=_quiet, data=mnist)
    assert (summary["best_epoch"], summary["test_error"]) == (whole["best_epoch"], whole["test_error"])
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["epoch"] == 3
    final = load_checkpoint(run / CHECKPOINT_NAME)[0]
    expected = load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)[0]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_checkpoint_seconds_is_validated(capsys):
    with pytest.raises(ConfigError, match="checkpoint_seconds must be a non-negative number"):
        recipe_config("mnist-float", checkpoint_seconds=-1)
    with pytest.raises(ConfigError, match="checkpoint_seconds must be a non-negative number"):
        recipe_config("mnist-float", checkpoint_seconds=float("nan"))
    assert recipe_config("mnist-float", checkpoint_seconds=0).checkpoint_seconds == 0
    assert recipe_config("mnist-float").checkpoint_seconds == 30  # the default
    assert_one_line_error(["train", "mnist-float", "--checkpoint-seconds", "-5"],
                          "argument --checkpoint-seconds: expected a non-negative number, got '-5'", capsys)


def test_checkpoint_on_the_cpu_holds_no_cuda_generator_state(tmp_path, mnist, one_thread):
    fit(_small(epochs=1), tmp_path / "run", progress=False, log=_quiet, data=mnist)
    tensors = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)[0]
    assert {"rng.shuffle", "rng.binarize", "rng.augment", "rng.torch"} <= tensors.keys()
    assert "rng.cuda" not in tensors


@needs_cuda
@pytest.mark.parametrize("compile_", [False, True])
def test_stochastic_gpu_run_resumes_bit_identically(tmp_path, mnist, compile_):
    # Compiled stochastic layers draw their binary weights from PyTorch's default CUDA generator (Dynamo
    # cannot trace an explicit generator): its state is checkpointed ("rng.cuda") and restored, so a run
    # stopped mid-epoch and resumed ends with every tensor equal to an uninterrupted run's. Without the
    # saved state the resumed run would draw the binary weights of its first steps again.
    options = dict(binarization="stochastic", device="cuda", compile=compile_, epochs=2, checkpoint_every=7)
    fit(_small(**options), tmp_path / "whole", progress=False, log=_quiet, data=mnist)

    def stop_after_epoch_1(line):  # raised after the epoch's log line: the last checkpoint is mid-epoch (step 14)
        if line.startswith("epoch    1/"):
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        fit(_small(**options), tmp_path / "run", progress=False, log=stop_after_epoch_1, data=mnist)
    assert read_checkpoint_state(tmp_path / "run" / CHECKPOINT_NAME)["step"] == 14
    resume(tmp_path / "run", progress=False, log=_quiet, data=mnist)
    final = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)[0]
    expected = load_checkpoint(tmp_path / "whole" / CHECKPOINT_NAME)[0]
    assert "rng.cuda" in expected and final.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(final[k], expected[k])] == []


@pytest.mark.parametrize("every", [10, 20])
def test_checkpoint_every_also_writes_the_step_counts_that_end_an_epoch(tmp_path, mnist, one_thread, monkeypatch,
                                                                           every):
    # 20 steps per epoch; epoch ends are not checkpointed by time here (the default 30 s), but a step count of
    # --checkpoint-every that falls on one still is: every 10 -> 10, 20, 30, ...; every 20 -> 20, 40, 60
    from binaryconnect import train

    written, save = [], train._save
    monkeypatch.setattr(train, "_save", lambda path, p, *a: (written.append(p.global_step), save(path, p, *a)))
    fit(_small(epochs=4, checkpoint_every=every), tmp_path / "run", progress=False, log=_quiet, data=mnist)
    assert written == [0, *range(every, 81, every)]


def test_a_generator_state_of_the_wrong_size_is_a_checkpoint_error(tmp_path, mnist, one_thread):
    from binaryconnect.checkpoint import save_checkpoint

    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    tensors, state = load_checkpoint(run / CHECKPOINT_NAME)
    save_checkpoint(run / CHECKPOINT_NAME, {**tensors, "rng.shuffle": tensors["rng.shuffle"][:100]}, state)
    with pytest.raises(CheckpointError, match=r"the checkpoint's shuffle generator state is unusable"):
        resume(run, epochs=2, progress=False, log=_quiet, data=mnist)


def _light(data):
    """``data`` with 1,000 validation and 1,000 test images: fast evaluations for tests that train many runs."""
    return dataclasses.replace(data, val_x=data.val_x[:1000], val_y=data.val_y[:1000], test_x=data.test_x[:1000],
                               test_y=data.test_y[:1000])


def _augmented(data, stop_at: int | None = None, signum: int = signal.SIGINT):
    """``data`` with a training transform that draws from both the run's augmentation generator and PyTorch's
    global generator (tiny noise: it changes the losses, not what is learnt), and that sends ``signum`` to
    this process at global step ``stop_at``."""
    calls = {"n": 0}

    def transform(x, generator):
        calls["n"] += 1
        if calls["n"] == stop_at:
            os.kill(os.getpid(), signum)
        noise = torch.rand(len(x), generator=generator).view(-1, *[1] * (x.dim() - 1))
        return x + 1e-3 * noise + 1e-3 * torch.rand(())

    return dataclasses.replace(data, train_transform=transform)


def test_stops_at_epoch_boundaries_and_generator_draws_resume_exactly(tmp_path, mnist, one_thread):
    """3 epochs of 6 steps; Ctrl-C at global step 6 (the last step of epoch 1: a checkpoint at step 6 of 6) and
    7 (the first step of epoch 2: one step into a new permutation, at a learning rate that is neither the
    first nor the last), with a training transform drawing from the augmentation generator and from
    PyTorch's global one: each stopped run, resumed, ends bit-identical to the uninterrupted run (every
    checkpoint tensor, both generators included, metrics and model). A resume that redrew the permutation of
    a started epoch, missed it in the checkpoint, took another learning rate for it, or left a generator as
    the seed made it would not."""
    config = _small(binarization="stochastic", train_subset=600, epochs=3)
    reference = tmp_path / "reference"
    mnist = _light(mnist)
    fit(config, reference, progress=False, log=_quiet, data=_augmented(mnist))
    for stop_at, epoch, step in ((6, 1, 6), (7, 2, 1)):
        run = tmp_path / f"run{stop_at}"
        with pytest.raises(TrainingInterrupted, match=rf"stopped by SIGINT at epoch {epoch}, step {step};"):
            fit(config, run, progress=False, log=_quiet, data=_augmented(mnist, stop_at))
        assert read_checkpoint_state(run / CHECKPOINT_NAME)["global_step"] == stop_at
        resume(run, progress=False, log=_quiet, data=_augmented(mnist))
        _assert_same_run(run, reference)


def test_a_signal_during_the_evaluation_stops_after_the_epoch_with_its_checkpoint(tmp_path, mnist, one_thread,
                                                                                   monkeypatch):
    """SIGTERM while epoch 1 is evaluated (no step left to finish): the epoch is completed, logged and
    checkpointed at its end, although the 30 s between epoch-end checkpoints have not passed, and the run
    stops with exit code 143 "after epoch 1"; resumed, it ends as the uninterrupted run."""
    from binaryconnect import train

    config = _small()
    fit(config, tmp_path / "reference", progress=False, log=_quiet, data=mnist)
    real_evaluate, calls = train.evaluate, {"n": 0}

    def evaluate_with_a_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", evaluate_with_a_signal)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM after epoch 1;") as info:
        fit(config, run, progress=False, log=_quiet, data=mnist)
    assert info.value.exit_code == 143
    state = read_checkpoint_state(run / CHECKPOINT_NAME)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 0, 20)
    assert [r["epoch"] for r in state["history"]] == [1]
    monkeypatch.undo()
    resume(run, progress=False, log=_quiet, data=mnist)
    _assert_same_run(run, tmp_path / "reference")


def test_a_second_signal_of_another_kind_does_not_change_the_stop(tmp_path, mnist, one_thread, monkeypatch):
    """Ctrl-C, then SIGTERM while the checkpoint is being written: the second signal is noted and ignored; the
    stop remains the first one's (SIGINT, exit code 130) and the checkpoint is complete."""
    first_ctrl_c, second = _second_signal_during_the_save(monkeypatch, signal.SIGTERM)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at epoch 1, step 3") as info:
        fit(_small(epochs=1), run, progress=False, log=_quiet, data=_call_hook(mnist, 3, first_ctrl_c))
    monkeypatch.undo()
    assert second["sent"] and info.value.exit_code == 130 and info.value.signum == signal.SIGINT
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["global_step"] == 3


def test_resume_refuses_fewer_epochs_than_a_stopped_run_has_begun(tmp_path, mnist, one_thread):
    """A run stopped in the middle of epoch 2 has begun 2 epochs: resuming it with --epochs 1 is refused
    (there is no way to end epoch 2 within 1 epoch), and nothing is written."""
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        fit(_small(epochs=3), run, progress=False, log=_quiet, data=_call_hook(mnist, 25, _sigint))
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    with pytest.raises(ConfigError, match="the run has already trained 2 epochs; ask for at least that many "
                                          r"\(--epochs\), got 1"):
        resume(run, progress=False, log=_quiet, data=mnist, epochs=1)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)


def test_resume_clears_stale_temporary_files_and_a_finished_runs_summary(tmp_path, mnist, one_thread):
    """Resuming removes the ``.<name>.*.tmp`` files a crash during a write left, and the summary of a finished
    run continued for more epochs: until it ends again, the run is not finished (a crash in epoch 2 leaves
    no summary that claims it was)."""
    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    stale = [run / ".checkpoint.safetensors.abc123.tmp", run / ".model.safetensors.def456.tmp"]
    for path in stale:
        path.write_bytes(b"partial")

    def crash_in_epoch_2(line):
        if line.startswith("epoch    2/"):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        resume(run, progress=False, log=crash_in_epoch_2, data=mnist, epochs=3)
    assert not any(path.exists() for path in stale)
    assert not (run / "summary.json").exists()


def test_resume_puts_back_the_checkpoints_best_model_before_training(tmp_path, mnist, one_thread):
    """model.safetensors may hold a model newer than the checkpoint (the best model written on the way out of
    a failed run, from epochs the checkpoint does not have): a resume, which trains those epochs again,
    first writes the checkpoint's own best model, so that a crash right after it starts leaves that one."""
    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    (run / "model.safetensors").write_bytes((run / CHECKPOINT_NAME).read_bytes())  # something else

    def crash_when_training_starts(line):
        if line.startswith("training "):
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        resume(run, progress=False, log=crash_when_training_starts, data=mnist, epochs=2)
    written = load_tensors(run / "model.safetensors")[0]
    best = {k[len("best."):]: v for k, v in load_checkpoint(run / CHECKPOINT_NAME)[0].items() if k.startswith("best.")}
    assert best and written.keys() == best.keys() and all(torch.equal(written[k], best[k]) for k in best)


def test_resume_refuses_other_training_images_with_the_same_labels(tmp_path, mnist, one_thread):
    """The data fingerprint covers the training images, not only the labels and shapes: one changed pixel of
    the first training image is other training data, refused."""
    run = tmp_path / "run"
    fit(_small(epochs=1), run, progress=False, log=_quiet, data=mnist)
    train_x = mnist.train_x.clone()
    train_x[0].view(-1)[300] += 0.5
    with pytest.raises(CheckpointError, match="training data differ from those the run was started with"):
        resume(run, progress=False, log=_quiet, data=dataclasses.replace(mnist, train_x=train_x), epochs=2)


class _Clock:
    """Stands for the ``time`` module in train.py: ``perf_counter`` reads a clock that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def strftime(fmt: str) -> str:
        return time.strftime(fmt)


def test_checkpoint_seconds_counts_from_the_last_checkpoint_and_wall_time_adds_up_over_resumes(
        tmp_path, mnist, one_thread, monkeypatch):
    """A clock that moves only at the epoch log lines, checkpoint_seconds 10: epoch 1 ends at t=10 (10 s since
    the start's checkpoint: written, the bound included), epoch 2 at t=13 (3 s since the last: skipped), epoch
    3 at t=20 (10 s since epoch 1's, not since the start: written). The run crashes when epoch 4 is logged; its
    checkpoint holds 20 s of training. Resumed on a clock that reads 1000 and logging epoch 4 5 s later, the
    last epoch is written and the summary's wall time is 20 + 5 s: earlier processes' time is kept."""
    from binaryconnect import train

    written, save = [], train._save
    monkeypatch.setattr(train, "_save", lambda path, p, *a: (written.append(p.global_step), save(path, p, *a)))
    clock = _Clock()
    monkeypatch.setattr(train, "time", clock)
    advance = {"epoch    1/": 10, "epoch    2/": 3, "epoch    3/": 7, "epoch    4/": 5}

    def log(line):
        clock.now += advance.get(line[:11], 0)
        if line.startswith("epoch    4/") and clock.now < 1000:
            raise RuntimeError("crash")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        fit(_small(epochs=4, checkpoint_seconds=10, train_subset=600), run, progress=False, log=log,
            data=_light(mnist))
    assert written == [0, 6, 18]  # global steps: 6 per epoch
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["seconds"] == 20

    clock.now = 1000.0
    summary = resume(run, progress=False, log=log, data=_light(mnist))
    assert written == [0, 6, 18, 24]
    assert summary["wall_seconds"] == 25


def test_the_best_model_file_follows_each_checkpoint(tmp_path, mnist, one_thread, monkeypatch):
    """Checkpoints at every epoch end and validation errors that keep falling (evaluate scripted): after each
    checkpoint model.safetensors holds that epoch's model, each new best written in turn, not only the
    first one; when an epoch is logged, the file still holds the previous checkpoint's best."""
    from binaryconnect import train

    snapshots, calls = [], {"n": 0}

    def scripted(model, x, y, batch_size=1000, samples=1):
        calls["n"] += 1
        if calls["n"] % 2:  # validation: errors 0.3, 0.2, 0.1
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return 0.4 - 0.1 * len(snapshots), 0.0
        return 0.5, 0.0

    monkeypatch.setattr(train, "evaluate", scripted)
    run, seen = tmp_path / "run", []

    def log(line):
        if line.startswith("epoch "):
            path = run / "model.safetensors"
            seen.append(load_tensors(path)[1]["epoch"] if path.exists() else None)

    fit(_small(epochs=3, checkpoint_seconds=0), run, progress=False, log=log, data=mnist)
    assert seen == [None, "1", "2"]
    written, metadata = load_tensors(run / "model.safetensors")
    assert metadata["epoch"] == "3" and all(torch.equal(written[k], snapshots[2][k]) for k in snapshots[2])


# every option of TrainConfig with another valid value (and what it needs to validate): a new option must be
# added here, which decides whether it may change on resume
_OTHER_VALUES = {
    "dataset": {"dataset": "cifar10"}, "model": {"model": "cnn"}, "model_kwargs": {"model_kwargs": {"depth": 2}},
    "dataset_kwargs": {"dataset_kwargs": {"preprocess": "center"}}, "binarization": {"binarization": "stochastic"},
    "H": {"H": 0.5}, "ste": {"ste": "clipped"}, "stochastic_eval": {"stochastic_eval": "sample"},
    "eval_samples": {"eval_samples": 4}, "lr_scale": {"lr_scale": "none"}, "epochs": {"epochs": 300},
    "batch_size": {"batch_size": 50}, "lr_start": {"lr_start": 2e-3}, "lr_end": {"lr_end": 1e-6},
    "val_size": {"val_size": 5000}, "train_subset": {"train_subset": 500}, "seed": {"seed": 1},
    "device": {"device": "cpu"}, "deterministic": {"deterministic": True}, "compile": {"compile": True},
    "compile_mode": {"compile": True, "compile_mode": "max-autotune-no-cudagraphs"}, "amp": {"amp": "bf16"},
    "channels_last": {"channels_last": True}, "cuda_graph": {"cuda_graph": True}, "eval_batch_size":
    {"eval_batch_size": 500}, "recipe": {"recipe": "mnist-float"}, "data_dir": {"data_dir": "/elsewhere"},
    "download": {"download": False}, "checkpoint_every": {"checkpoint_every": 50},
    "checkpoint_seconds": {"checkpoint_seconds": 5.0}, "time_budget": {"time_budget": 600.0},
}
# how long it trains, where and how fast, how often it checkpoints: never what is trained (config.py)
_MAY_CHANGE = {"epochs", "device", "checkpoint_every", "checkpoint_seconds", "eval_batch_size", "data_dir", "download",
               "deterministic", "compile", "compile_mode", "amp", "channels_last", "cuda_graph"}


def test_only_options_that_leave_what_is_trained_unchanged_may_change_on_resume():
    """Each option of the configuration, changed alone when resuming (``resume_config``, no training): those of
    the list above are accepted and reported as changes; every other one (the model, the data and their
    preprocessing, the binarization, the optimizer's schedule and scales, the evaluation, the seed) is refused
    with a message naming it. An option given with the run's own value, or a model option given alone, is no
    change."""
    from binaryconnect.config import TrainConfig, resume_config

    assert set(_OTHER_VALUES) == {f.name for f in dataclasses.fields(TrainConfig)}
    saved = recipe_config("mnist-deterministic")
    for name, overrides in _OTHER_VALUES.items():
        if name in _MAY_CHANGE:
            config, changes = resume_config(saved, **copy.deepcopy(overrides))
            assert changes[name] == [getattr(saved, name), getattr(config, name)], name
            assert set(changes) <= _MAY_CHANGE
        else:
            with pytest.raises(ConfigError, match=rf"the run was started with a different {name} \(run: "):
                resume_config(saved, **copy.deepcopy(overrides))
    same = {"model_kwargs": {"hidden": 1024}, "seed": 0, "binarization": "deterministic", "epochs": 250}
    assert resume_config(saved, **same) == (saved, {})
