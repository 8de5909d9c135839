"""Reliability guards (README, "Reliability"): the NaN/Inf guard keeps the last good checkpoint, latent
weights stay in [-H, H] and binary weights are exactly +-H after every step (a property test over random
layers and steps), a corrupted dataset stops the command before training, determinism, and one clear
line for every bad configuration."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from binaryconnect.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_tensors, read_checkpoint_state
from binaryconnect.cli import main
from binaryconnect.errors import DIVERGED_NAME, TrainingDiverged
from binaryconnect.layers import BinaryConv2d, BinaryLinear, binary_layers, set_generator
from binaryconnect.losses import square_hinge_loss
from binaryconnect.optim import make_optimizer
from binaryconnect.train import _algorithms, fit, resume
from helpers import quiet as _quiet
from helpers import small_config as _small

# torchvision's MNIST resources: the official MD5 of each file
OFFICIAL_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def _cli(args: list[str], data_root, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "BINARYCONNECT_DATA": str(data_root), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "binaryconnect.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


# --- numerical guard ---


def test_nan_loss_stops_before_the_step_and_leaves_the_last_checkpoint_intact(tmp_path, mnist, one_thread):
    """A NaN enters the batch of global step 18 (epoch 1, step 18); with a checkpoint every 5 steps the
    last good one is at step 15. It must be byte-for-byte what it was when the bad step began, and
    resuming it on clean data must end exactly as a run that never saw the NaN."""
    config = _small(binarization="stochastic", checkpoint_every=5)
    run, reference = tmp_path / "run", tmp_path / "reference"
    fit(config, reference, progress=False, log=_quiet, data=mnist)

    calls, snapshot = {"n": 0}, {}

    def poison(x, generator):
        calls["n"] += 1
        if calls["n"] == 18:
            snapshot["checkpoint"] = (run / CHECKPOINT_NAME).read_bytes()
            return x * math.nan
        return x

    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1, step 18: training stopped before "
                                               r"the optimizer step; the last good checkpoint \(epoch 1, step 15\)"
                       ) as info:
        fit(config, run, progress=False, log=_quiet, data=dataclasses.replace(mnist, train_transform=poison))
    assert info.value.exit_code == 3
    assert (run / CHECKPOINT_NAME).read_bytes() == snapshot["checkpoint"]
    tensors, state = load_checkpoint(run / CHECKPOINT_NAME)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 15, 15)
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if t.is_floating_point())
    assert not (run / "summary.json").exists()
    # where it diverged, for a repeated sweep (which does not resume such a run) and for report
    marker = json.loads((run / DIVERGED_NAME).read_text())
    assert (marker["epoch"], marker["step"], marker["loss"]) == (1, 18, "nan")
    assert marker["message"] == str(info.value)

    resume(run, progress=False, log=_quiet, data=mnist)  # tried again: the marker goes
    assert not (run / DIVERGED_NAME).exists()
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
    got, _ = load_checkpoint(run / CHECKPOINT_NAME)
    want, _ = load_checkpoint(reference / CHECKPOINT_NAME)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("bad_step, detected", [(18, "before the optimizer step of step 19"),
                                                 (20, "after step 20")])
def test_nan_found_by_a_checking_interval_is_named_exactly_and_nothing_is_saved(
        tmp_path, mnist, one_thread, monkeypatch, bad_step, detected):
    """On a GPU the loss is checked every few steps (not to stall the device), and before any write. With an
    interval of 4 forced on the CPU and a checkpoint every 5 steps: checks at steps 4, 5, 9, 10, 14, 15, 19 and
    the epoch's end (20). A NaN at step 18 is found before the optimizer step of step 19; one at step 20 after
    its optimizer step, before the epoch's evaluation. Either way the step is named, the checkpoint of step 15
    is untouched and resuming it on clean data ends exactly as a run that never saw the NaN."""
    monkeypatch.setattr("binaryconnect.train.finite_check_interval", lambda device: 4)
    config = _small(binarization="stochastic", checkpoint_every=5, epochs=1)
    run, reference = tmp_path / "run", tmp_path / "reference"
    fit(config, reference, progress=False, log=_quiet, data=mnist)
    calls, snapshot = {"n": 0}, {}

    def poison(x, generator):
        calls["n"] += 1
        if calls["n"] == bad_step:
            snapshot["checkpoint"] = (run / CHECKPOINT_NAME).read_bytes()
            return x * math.nan
        return x

    with pytest.raises(TrainingDiverged, match=rf"loss became nan at epoch 1, step {bad_step}: detected {detected} "
                                               r"\(on cpu the loss is checked every 4 steps.*nothing was saved "
                                               r"since; the last good checkpoint \(epoch 1, step 15\)"):
        fit(config, run, progress=False, log=_quiet, data=dataclasses.replace(mnist, train_transform=poison))
    assert (run / CHECKPOINT_NAME).read_bytes() == snapshot["checkpoint"]
    assert not (run / "model.safetensors").exists() and not (run / "summary.json").exists()
    resume(run, progress=False, log=_quiet, data=mnist)
    assert (run / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()


def test_a_run_that_diverges_leaves_the_best_model_of_its_finished_epochs(tmp_path, mnist, one_thread):
    """Checkpoints (and with them the best-model file) are written at most every 30 s by default, so a short
    run diverging in epoch 3 has only its start's checkpoint; on the way out it still writes the best model
    of epochs 1-2 (each checked finite before its evaluation). The oracle: the same run with a checkpoint
    after every epoch, whose best-model file holds that model when epoch 3 is logged."""
    snapshot = {}

    def at_epoch_3(line):  # epoch 3's checkpoint comes after its log line: the file holds epochs 1-2's best
        if line.startswith("epoch    3/"):
            snapshot["best"] = load_tensors(tmp_path / "reference" / "model.safetensors")
            snapshot["checkpoint_epoch"] = read_checkpoint_state(tmp_path / "reference" / CHECKPOINT_NAME)["epoch"]

    fit(_small(epochs=4, checkpoint_seconds=0), tmp_path / "reference", progress=False, log=at_epoch_3, data=mnist)
    assert snapshot["checkpoint_epoch"] == 2
    calls = {"n": 0}

    def poison(x, generator):  # 20 steps per epoch: epoch 3, step 5
        calls["n"] += 1
        return x * math.nan if calls["n"] == 45 else x

    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"at epoch 3, step 5: .*the last good checkpoint \(epoch 1, step 0\)"):
        fit(_small(epochs=4), run, progress=False, log=_quiet, data=dataclasses.replace(mnist, train_transform=poison))
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["epoch"] == 0  # only the start's
    written, metadata = load_tensors(run / "model.safetensors")
    expected, expected_metadata = snapshot["best"]
    assert metadata["epoch"] == expected_metadata["epoch"] in ("1", "2")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    assert all(torch.isfinite(t).all() for t in written.values() if t.is_floating_point())


def test_diverging_run_exits_with_code_3_and_one_line(tmp_path, data_root):
    """A learning rate of 1e30 blows the batch-norm parameters up: the loss is inf at the second step (nan
    with torch 2.11's kernels: both are caught, at the same step)."""
    run = tmp_path / "run"
    proc = _cli(["train", "mnist-deterministic", "--train-subset", "2000", "--hidden", "64", "--epochs", "2",
                 "--device", "cpu", "--no-progress", "--lr-start", "1e30", "--lr-end", "1e30", "-o", str(run)],
                data_root)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert re.match(r"binaryconnect: error: loss became (inf|nan) at epoch 1, step 2: training stopped before the "
                    r"optimizer step", proc.stderr), proc.stderr
    tensors, state = load_checkpoint(run / CHECKPOINT_NAME)  # the checkpoint written at the start
    assert state["global_step"] == 0
    assert json.loads((run / DIVERGED_NAME).read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_latent_weights_stay_in_H_and_binary_weights_are_exactly_plus_minus_H(one_thread):
    """Property over 60 random cases (seeded): layer type and shape, H, binarization, STE, learning rate
    (1e-4 .. 10) and input scale (1e-2 .. 1e3), 1-8 Adam steps. After every step every latent weight lies
    in [-H, H] and the weight propagated in training is exactly +H or -H (and sign(W) for deterministic)."""
    rng = random.Random(20151102)
    clipped = 0
    for case in range(60):
        H = rng.choice([1.0, 0.5, 0.1, 2.0, rng.uniform(0.05, 4.0)])
        binarization = rng.choice(["deterministic", "stochastic"])
        ste = rng.choice(["identity", "clipped"])
        lr = 10 ** rng.uniform(-4, 1)
        scale = 10 ** rng.uniform(-2, 3)
        classes, batch = rng.randint(2, 12), rng.randint(2, 16)
        torch.manual_seed(case)
        if rng.random() < 0.5:
            fan_in = rng.randint(1, 40)
            model = nn.Sequential(BinaryLinear(fan_in, classes, binarization=binarization, H=H, ste=ste),
                                  nn.BatchNorm1d(classes))
            shape = (batch, fan_in)
        else:
            channels, size, kernel = rng.randint(1, 4), rng.randint(3, 6), rng.choice([1, 3])
            conv = BinaryConv2d(channels, classes, kernel, padding=kernel // 2, binarization=binarization, H=H,
                                ste=ste)
            model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(classes))
            shape = (batch, channels, size, size)
        set_generator(model, torch.Generator().manual_seed(case))
        optimizer = make_optimizer(model, lr, rng.choice(["glorot", "none"]))
        layer = next(binary_layers(model))
        bound = torch.tensor(H, dtype=torch.float32)
        for _ in range(rng.randint(1, 8)):
            optimizer.zero_grad()
            square_hinge_loss(model(torch.randn(shape) * scale), torch.randint(0, classes, (batch,))).backward()
            optimizer.step()
            w = layer.weight.detach()
            assert w.abs().max() <= bound, (case, w.abs().max().item(), H)
            wb = layer.effective_weight().detach()
            assert torch.equal(wb.abs(), bound.expand_as(wb)), case
            if binarization == "deterministic":
                assert torch.equal(wb, torch.where(w >= 0, bound, -bound))
            clipped += int((w.abs() == bound).sum())
    assert clipped > 0  # the clipping was exercised, not only weights that never reached H


# --- data integrity ---


def test_a_flipped_byte_in_the_dataset_stops_training_before_it_starts(tmp_path, data_root):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in OFFICIAL_MD5:
        shutil.copyfile(data_root / "MNIST" / "raw" / name, raw / name)
    target = raw / "train-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    actual = hashlib.md5(data).hexdigest()

    run = tmp_path / "run"
    proc = _cli(["train", "mnist-deterministic", "--data-dir", str(tmp_path / "data"), "--no-download",
                 "--device", "cpu", "-o", str(run)], data_root)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"checksum mismatch for {target}: expected md5 {OFFICIAL_MD5[target.name]}, got {actual}" in proc.stderr
    assert proc.stdout == "" and not run.exists()  # training never started: no run directory at all


# --- determinism ---


def test_cudnn_autotuning_only_on_a_gpu_without_deterministic_and_restored():
    cases = ((False, "cuda", True), (True, "cuda", False), (False, "cpu", False))
    for deterministic, device, autotuned in cases:  # setting the flags needs no GPU
        with _algorithms(deterministic, torch.device(device)):
            assert torch.backends.cudnn.benchmark is autotuned
            assert torch.are_deterministic_algorithms_enabled() is deterministic
        assert torch.backends.cudnn.benchmark is False and not torch.are_deterministic_algorithms_enabled()


def test_same_seed_is_bit_identical_and_another_seed_is_not(tmp_path, mnist, one_thread):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        fit(_small(binarization="stochastic", deterministic=True, seed=seed, epochs=1), tmp_path / name,
            progress=False, log=_quiet, data=mnist)
    assert not torch.are_deterministic_algorithms_enabled()  # the setting is restored after the run
    files = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "abc"}
    assert files["a"] == files["b"]
    a, _ = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    c, _ = load_checkpoint(tmp_path / "c" / CHECKPOINT_NAME)
    for key in ("model.layers.1.weight", "rng.shuffle", "rng.binarize"):
        assert not torch.equal(a[key], c[key]), key  # the seed reaches weights, shuffling and sampling
    assert read_checkpoint_state(tmp_path / "c" / CHECKPOINT_NAME)["config"]["seed"] == 1


# --- bad configuration: one line, never a traceback ---


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "mnist"], "unknown recipe 'mnist'; known recipes: "),
        (["train", "mnist-deterministic", "--lr-start", "-0.1"],
         "argument --lr-start: expected a positive number, got '-0.1'"),
        (["train", "mnist-deterministic", "--lr-start", "nan"], "argument --lr-start: expected a positive number"),
        (["train", "mnist-deterministic", "--lr-start", "1e-5", "--lr-end", "1e-3"],
         "lr_end (0.001) must not exceed lr_start (1e-05)"),
        (["train", "mnist-deterministic", "--hidden", "0"], "argument --hidden: expected a positive integer, got '0'"),
        (["train", "mnist-deterministic", "--depth", "-1"], "argument --depth: expected a non-negative integer"),
        (["train", "mnist-deterministic", "--H", "0"], "argument --H: expected a positive number, got '0'"),
        (["train", "mnist-deterministic", "--checkpoint-every", "0"], "argument --checkpoint-every: expected a "
                                                                      "positive integer"),
        (["train", "mnist-deterministic", "--train-subset", "50", "--batch-size", "100", "--no-download"],
         "batch_size 100 is larger than the 50 training examples"),
        (["train", "mnist-deterministic", "--val-size", "60000", "--no-download"],
         "val_size must be between 1 and 59999, got 60000"),
        (["train", "mnist-deterministic", "--data-dir", "/nonexistent/data", "--no-download"],
         "MNIST not found: /nonexistent/data/MNIST/raw lacks"),
        (["train", "mnist-deterministic", "--dataset-option", "foo=1", "--no-download"],
         "dataset 'mnist' has no option 'foo'; its options: verify, preprocess"),
        (["train", "mnist-deterministic", "--preprocess", "gcn", "--no-download"],
         "MNIST preprocess must be one of symmetric, center, got 'gcn'"),
        (["train", "--resume", "/nonexistent/run"], "/nonexistent/run does not exist (or is not a directory)"),
        (["train", "mnist-deterministic", "--resume", "/nonexistent/run", "-o", "x"], "--resume continues RUN_DIR"),
    ],
)
def test_bad_configuration_gives_one_clear_line(argv, message, tmp_path, capsys, data_root, monkeypatch):
    monkeypatch.setenv("BINARYCONNECT_DATA", str(data_root))
    if argv[1] != "--resume" and "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "run")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors leave through SystemExit, after printing their line
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("binaryconnect")
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_bad_configuration_in_a_real_process(tmp_path, data_root):
    """The same through the executable: exit code 2, one line on stderr, no traceback, nothing written."""
    for argv, env, message in [
        (["train", "mnist-nope"], {}, "unknown recipe 'mnist-nope'"),
        (["train", "mnist-deterministic", "--no-download"], {"BINARYCONNECT_DATA": str(tmp_path / "missing")},
         f"MNIST not found: {tmp_path / 'missing' / 'MNIST' / 'raw'} lacks"),
    ]:
        proc = _cli([*argv, "-o", str(tmp_path / "run")], data_root, **env)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "run").exists()


def _light(data):
    """``data`` with 1,000 validation and 1,000 test images: fast evaluations for tests that train many runs."""
    return dataclasses.replace(data, val_x=data.val_x[:1000], val_y=data.val_y[:1000], test_x=data.test_x[:1000],
                               test_y=data.test_y[:1000])


@pytest.mark.parametrize("interval, bad_steps, message, steps_taken, last_good", [
    (1, (18,), "18: training stopped before the optimizer step;", 17, 15),
    (4, (16,), "16: detected before the optimizer step of step 19 ", 18, 15),  # the first loss of a window
    (4, (19,), "19: training stopped before the optimizer step;", 18, 15),  # the last: its step never runs
    (4, (17, 19), "17: detected before the optimizer step of step 19 ", 18, 15),  # the first bad one is named
    (4, (5,), "5: detected after step 5 ", 5, 0),  # the window of the checkpoint at step 5: checked before it
])
def test_the_guard_names_the_first_bad_step_and_stops_before_any_later_step(
        tmp_path, mnist, one_thread, monkeypatch, interval, bad_steps, message, steps_taken, last_good):
    """NaN inputs at the given steps of a run checkpointing every 5 steps, with the loss checked every step
    (the CPU's interval) or every 4 (a GPU's way, forced here: checks at 4, 5, 9, 10, 14, 15, 19, 20). The
    error names the first bad step and how it was found, the optimizer ran exactly the steps up to the
    check (counted by a hook; none after a bad loss on the CPU, and the model in memory is then still
    finite), and the checkpoint left is the last one written before the bad step, never one after it."""
    from binaryconnect import train

    monkeypatch.setattr(train, "finite_check_interval", lambda device: interval)
    made = {}

    def counting_optimizer(model, *args, **kwargs):
        optimizer = make_optimizer(model, *args, **kwargs)
        made.update(model=model, steps=0)
        optimizer.register_step_post_hook(lambda *a: made.update(steps=made["steps"] + 1))
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", counting_optimizer)
    calls = {"n": 0}

    def poison(x, generator):
        calls["n"] += 1
        return x * math.nan if calls["n"] in bad_steps else x

    run = tmp_path / "run"
    data = dataclasses.replace(_light(mnist), train_transform=poison)
    with pytest.raises(TrainingDiverged, match=rf"loss became nan at epoch 1, step {message}.*the last good "
                                               rf"checkpoint \(epoch 1, step {last_good}\)"):
        fit(_small(epochs=1, checkpoint_every=5), run, progress=False, log=_quiet, data=data)
    assert made["steps"] == steps_taken
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["global_step"] == last_good
    tensors, _ = load_checkpoint(run / CHECKPOINT_NAME)
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    if interval == 1:
        assert all(torch.isfinite(p).all() for p in made["model"].parameters())


class _Crash(BaseException):
    """Stands for an exception that is not an ``Exception`` (KeyboardInterrupt, SystemExit ...)."""


def test_a_run_ended_by_a_base_exception_still_leaves_its_best_model(tmp_path, mnist, one_thread):
    """The best model of the finished epochs is written on the way out of a run ended by anything, not only
    by an ``Exception``: here a BaseException raised when epoch 2 is logged (before any checkpoint after
    the start's, 30 s not having passed). The oracle: the same run checkpointing every epoch, whose best-model
    file holds, when epoch 3 is logged, the best model of epochs 1-2."""
    data, snapshot = _light(mnist), {}

    def at_epoch_3(line):
        if line.startswith("epoch    3/"):
            snapshot["best"] = load_tensors(tmp_path / "reference" / "model.safetensors")

    fit(_small(epochs=3, checkpoint_seconds=0), tmp_path / "reference", progress=False, log=at_epoch_3, data=data)

    def crash_at_epoch_2(line):
        if line.startswith("epoch    2/"):
            raise _Crash

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        fit(_small(epochs=3), run, progress=False, log=crash_at_epoch_2, data=data)
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["global_step"] == 0
    written, metadata = load_tensors(run / "model.safetensors")
    expected, expected_metadata = snapshot["best"]
    assert metadata["epoch"] == expected_metadata["epoch"] in ("1", "2")
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
