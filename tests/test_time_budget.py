"""``time_budget`` (``--time-budget SECONDS``): after the first epoch a run plans how many epochs fit in its
budget (at most ``epochs``), and from then on is the run of that many epochs: same learning-rate schedule,
same weights. Tests run real MNIST on the CPU; where the number of epochs must be known, ``plan_epochs`` is
replaced by one that records its arguments and returns a chosen number (the timing itself is not tested
here: speed lives in benchmarks)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from binaryconnect import train
from binaryconnect.checkpoint import CHECKPOINT_NAME, load_checkpoint, load_tensors, read_checkpoint_state
from binaryconnect.cli import main
from binaryconnect.config import keeps_plan
from binaryconnect.errors import ConfigError, TrainingInterrupted
from binaryconnect.optim import exponential_lr
from binaryconnect.report import format_report, group_runs, read_run
from binaryconnect.train import fit, plan_epochs, resume
from helpers import assert_one_line_error, quiet, small_config


def _light(data, stop_at: int | None = None):
    """``data`` with 1,000 validation and test images (fast evaluations) and, with ``stop_at``, a training
    transform that changes nothing but sends SIGINT to this process at global step ``stop_at``."""
    calls = {"n": 0}

    def transform(x, generator):  # noqa: ARG001
        calls["n"] += 1
        if calls["n"] == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        return x

    return dataclasses.replace(data, val_x=data.val_x[:1000], val_y=data.val_y[:1000], test_x=data.test_x[:1000],
                               test_y=data.test_y[:1000], train_transform=transform if stop_at else None)


def _config(**kw):
    return small_config(train_subset=600, **{"epochs": 8, "time_budget": 60.0, **kw})


def _planned(monkeypatch, epochs: int) -> list[tuple]:
    """Make every plan ``epochs`` epochs (capped as the real one caps); return the list its calls go to."""
    calls = []

    def fake(budget, elapsed, epoch_seconds, final_seconds, cap, margin=train.BUDGET_MARGIN):
        calls.append((budget, elapsed, epoch_seconds, final_seconds, cap))
        return min(epochs, cap)

    monkeypatch.setattr(train, "plan_epochs", fake)
    return calls


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("budget, elapsed, epoch_seconds, final_seconds, cap, margin, want", [
    (100, 10, 5, 1, 1000, 0.98, 18),  # room 98 - 10 - 1 = 87: 17 more epochs of 5 s, and the first
    (100, 10, 5, 1, 1000, 1.0, 18),   # room 89: still 17 more
    (100, 10, 5, 0, 1000, 1.0, 19),   # room 90: exactly 18 more
    (100, 10, 5, 1, 12, 0.98, 12),    # the cap
    (100, 99, 5, 1, 1000, 0.98, 1),   # no room: the first epoch only
    (100, 150, 5, 1, 1000, 0.98, 1),  # the first epoch alone overran the budget
    (100, 10, 0.0, 1, 7, 0.98, 7),    # an epoch that took no measurable time: the cap
])
def test_plan_epochs_fits_whole_epochs_into_the_margin_of_the_budget(budget, elapsed, epoch_seconds,
                                                                     final_seconds, cap, margin, want):
    assert plan_epochs(budget, elapsed, epoch_seconds, final_seconds, cap, margin) == want
    assert train.BUDGET_MARGIN == 0.98  # the default margin the README states


def test_a_planned_run_is_the_run_of_that_many_epochs(tmp_path, mnist, monkeypatch, one_thread):
    """A budget that plans 3 epochs of at most 8 gives, tensor for tensor, the run of ``epochs=3`` without a
    budget: the first epoch (trained before the plan, at ``lr_start`` either way) and the schedule after it
    are those of 3 epochs. The run directory says 3 epochs, and the budget it was planned under."""
    calls = _planned(monkeypatch, 3)
    data = _light(mnist)
    lines = []
    summary = fit(_config(), tmp_path / "budget", progress=False, log=lines.append, data=data)
    fit(_config(epochs=3, time_budget=None), tmp_path / "plain", progress=False, log=quiet, data=data)
    [(budget, elapsed, epoch_seconds, final_seconds, cap)] = calls  # planned once, after the first epoch
    assert (budget, cap) == (60.0, 8) and elapsed > 0 and epoch_seconds > 0 and final_seconds > 0
    got, _ = load_checkpoint(tmp_path / "budget" / CHECKPOINT_NAME)
    want, _ = load_checkpoint(tmp_path / "plain" / CHECKPOINT_NAME)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    (model, _), (plain_model, _) = (load_tensors(tmp_path / r / "model.safetensors") for r in ("budget", "plain"))
    assert all(torch.equal(model[k], plain_model[k]) for k in plain_model)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(tmp_path / "budget")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(tmp_path / "plain")]
    assert [r["lr"] for r in strip] == [exponential_lr(e, 3, 1e-3, 3e-6) for e in range(3)]
    written = json.loads((tmp_path / "budget" / "config.json").read_text())
    config, plan = written["config"], written["plan"]
    assert (config["epochs"], config["time_budget"], summary["epochs"]) == (3, 60.0, 3)
    assert plan == {"epochs": 3, "cap": 8, "elapsed_seconds": elapsed,
                    "epoch_seconds": plan["epoch_seconds"], "checkpoint_seconds": final_seconds}
    assert "plan" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "at most 8 epochs in 60 s (planned after the first)" in lines[0]
    [plan] = [line for line in lines if line.startswith("time budget")]
    assert plan.startswith("time budget 60 s: ") and plan.endswith(": 3 epochs of at most 8")
    assert lines.index(plan) == 1 and lines[2].startswith("epoch    1/3 ")  # planned before epoch 1's line


def test_the_progress_bar_of_the_first_epoch_gives_the_cap_as_an_upper_bound(tmp_path, mnist, monkeypatch):
    """Before the plan the number of epochs is not known: the first epoch's bar says "at most" the cap, the
    later ones the planned number; without a budget, the number of epochs."""
    _planned(monkeypatch, 2)
    labels = []

    def progress(iterable, total, desc, enabled):  # noqa: ARG001
        labels.append(desc)
        return iterable

    monkeypatch.setattr(train, "_progress", progress)
    fit(_config(), tmp_path / "budget", progress=True, log=quiet, data=_light(mnist))
    assert labels == ["epoch 1/at most 8, planned after this one", "epoch 2/2"]
    labels.clear()
    fit(_config(time_budget=None, epochs=2), tmp_path / "plain", progress=True, log=quiet, data=_light(mnist))
    assert labels == ["epoch 1/2", "epoch 2/2"]


def test_the_caller_s_configuration_is_left_as_it_was(tmp_path, mnist, monkeypatch):
    _planned(monkeypatch, 2)
    config = _config()
    fit(config, tmp_path / "run", progress=False, log=quiet, data=_light(mnist))
    assert config.epochs == 8 and config.time_budget == 60.0


def test_the_real_plan_with_a_large_and_a_tiny_budget(tmp_path, mnist, one_thread):
    """Unpatched: a budget of a day trains all of the cap (3 epochs); one of a microsecond stops after the
    first epoch, which alone took more, and says so."""
    data = _light(mnist)
    lines = []
    fit(_config(epochs=3, time_budget=86_400.0), tmp_path / "day", progress=False, log=lines.append, data=data)
    assert any(line.endswith(": 3 epochs (all of the --epochs cap)") for line in lines)
    assert len(_metrics(tmp_path / "day")) == 3
    assert not any("past the time budget" in line for line in lines)
    lines = []
    summary = fit(_config(time_budget=1e-6), tmp_path / "tiny", progress=False, log=lines.append, data=data)
    assert summary["epochs"] == 1 and len(_metrics(tmp_path / "tiny")) == 1
    [plan] = [line for line in lines if line.startswith("time budget")]
    assert ": 1 epoch of at most 8; the first epoch alone took " in plan
    # said at half the first epoch (600 images, batch 100: 3 of 6 steps), before the plan
    [overrun] = [line for line in lines if "past the time budget" in line]
    assert overrun.startswith("the first epoch's first 3 of 6 steps took ") and lines.index(overrun) < lines.index(plan)
    assert "past the time budget of 1e-06 s; it is trained whole" in overrun

    state = read_checkpoint_state(tmp_path / "tiny" / CHECKPOINT_NAME)
    assert (state["epoch"], state["step"], state["config"]["epochs"]) == (1, 0, 1)  # the final checkpoint


@pytest.mark.parametrize("elapsed, done, steps, said", [
    (10.0, 5, 10, False),  # projected 20 s: the budget exactly, not past it
    (10.1, 5, 10, True),
    (30.0, 100, 900, True),  # 270 s
    (2.0, 450, 900, False),
    (5.0, 0, 10, False),  # no step done: nothing to project
])
def test_the_first_epoch_overrun_is_said_when_its_projection_passes_the_budget(elapsed, done, steps, said):
    lines = []
    train._say_if_first_epoch_overruns(20.0, elapsed, done, steps, lines.append)  # projected elapsed * steps / done
    assert len(lines) == (1 if said else 0)
    if said:
        assert f"first {done} of {steps} steps took {elapsed:.0f} s" in lines[0]
        assert f"about {elapsed * steps / done:.0f} s of training" in lines[0]


def test_the_plan_s_measurements_come_from_the_run(tmp_path, mnist, monkeypatch, one_thread):
    """What the plan is given: the budget, the run's seconds so far (at least its first epoch's), seconds per
    epoch no larger than the whole first epoch (whose first steps pay for warming up) and positive, and the
    checkpoint's write time; and an epoch's time times the planned epochs fits the margin of the budget."""
    seen = []
    real = train.plan_epochs

    def spy(*args, **kwargs):
        seen.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "plan_epochs", spy)
    summary = fit(_config(epochs=1000, time_budget=4.0), tmp_path / "run", progress=False, log=quiet,
                  data=_light(mnist))
    [(budget, elapsed, epoch_seconds, final_seconds, cap)] = seen
    first = _metrics(tmp_path / "run")[0]["seconds"]
    assert budget == 4.0 and cap == 1000 and elapsed >= first and 0 < final_seconds < 4.0 and epoch_seconds > 0
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    plan = written["plan"]
    planned = real(budget, elapsed, epoch_seconds, final_seconds, cap)
    assert 1 <= planned < 1000 and elapsed + (planned - 1) * epoch_seconds + final_seconds <= 0.98 * 4.0
    assert summary["epochs"] == written["config"]["epochs"] == plan["epochs"] == len(_metrics(tmp_path / "run"))
    # the first plan, or replans of it (this CPU is shared): shorter if later epochs ran slower than the first
    # promised, longer (up to the cap) only in the first half of the plan it replaced
    previous = planned
    for r in plan.get("replans", []):
        assert r["epochs"] < previous or (previous < r["epochs"] <= 1000 and 2 * r["after_epoch"] < previous)
        previous = r["epochs"]
    assert plan["epochs"] == previous


@pytest.mark.parametrize("plan, budget, epochs, kept", [
    ({"epochs": 40, "cap": 500}, 540.0, 500, True),  # the budget and the cap again (a repeated sweep)
    ({"epochs": 40, "cap": 500}, 540.0, None, False),  # --epochs not given: resume_config keeps the plan's 40
    ({"epochs": 40, "cap": 500}, 540.0, 600, False),  # another --epochs: the new number of epochs
    ({"epochs": 40, "cap": 500}, 300.0, 500, False),  # another budget (which a resume then refuses)
    (None, 540.0, 500, False),  # stopped in its first epoch: no plan yet
    ([], 540.0, 500, False),  # a damaged plan is no plan
])
def test_a_plan_stands_only_for_the_same_budget_and_cap(plan, budget, epochs, kept):
    """The one rule ``train --resume`` and a repeated ``sweep`` share for a budgeted run's plan."""
    assert keeps_plan(plan, 540.0, budget, epochs) is kept


def test_a_planned_run_stopped_and_resumed_keeps_its_plan(tmp_path, mnist, monkeypatch, one_thread):
    """Ctrl-C in epoch 2 of a run planned to 3 epochs; resumed as a repeated sweep resumes it (the same budget
    and cap again), it ends as the uninterrupted run: the plan stands. Resumed with --epochs and no budget,
    the finished run trains on to the new number, as any run."""
    _planned(monkeypatch, 3)
    config = _config()
    fit(config, tmp_path / "reference", progress=False, log=quiet, data=_light(mnist))
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at epoch 2, step 2"):
        fit(config, run, progress=False, log=quiet, data=_light(mnist, stop_at=8))  # 6 steps per epoch
    assert read_checkpoint_state(run / CHECKPOINT_NAME)["config"]["epochs"] == 3
    resume(run, progress=False, log=quiet, data=_light(mnist), epochs=8, time_budget=60.0)
    got, want = (load_checkpoint(r / CHECKPOINT_NAME)[0] for r in (run, tmp_path / "reference"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert len(_metrics(run)) == 3
    lines = []
    summary = resume(run, progress=False, log=lines.append, data=_light(mnist), epochs=8, time_budget=60.0)
    assert summary["epochs"] == 3 and "already finished its 3 epochs" in lines[0]
    summary = resume(run, progress=False, log=quiet, data=_light(mnist), epochs=4)
    assert summary["epochs"] == 4 and len(_metrics(run)) == 4


@pytest.mark.parametrize("stop_at", [4, 6])  # mid-epoch; after the last of its 6 steps
def test_a_run_stopped_in_its_first_epoch_plans_when_resumed(tmp_path, mnist, monkeypatch, one_thread, stop_at):
    calls = _planned(monkeypatch, 2)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=f"stopped by SIGINT at epoch 1, step {stop_at}"):
        fit(_config(), run, progress=False, log=quiet, data=_light(mnist, stop_at=stop_at))
    assert calls == [] and read_checkpoint_state(run / CHECKPOINT_NAME)["config"]["epochs"] == 8
    summary = resume(run, progress=False, log=quiet, data=_light(mnist))
    [(_, elapsed, epoch_seconds, checkpoint_seconds, cap)] = calls
    assert cap == 8 and summary["epochs"] == 2 and elapsed > 0 and epoch_seconds > 0
    assert checkpoint_seconds > 0  # the resumed process wrote a checkpoint first, to know what one costs
    if stop_at == 6:  # no step left to time: the run so far stands for them
        assert epoch_seconds >= elapsed


def test_a_plan_that_took_its_whole_cap_trains_on_when_resumed_with_more_epochs(tmp_path, mnist, monkeypatch,
                                                                              one_thread):
    """Planned to all of its cap (2), resumed with the same budget and another --epochs (5): that is the new
    number of epochs, as for any run; with the cap again, nothing to do."""
    _planned(monkeypatch, 100)
    run = tmp_path / "run"
    assert fit(_config(epochs=2), run, progress=False, log=quiet, data=_light(mnist))["epochs"] == 2
    lines = []
    assert resume(run, progress=False, log=lines.append, data=_light(mnist), epochs=2, time_budget=60.0)["epochs"] == 2
    assert "already finished its 2 epochs" in lines[0]
    assert resume(run, progress=False, log=quiet, data=_light(mnist), epochs=5, time_budget=60.0)["epochs"] == 5
    assert len(_metrics(run)) == 5
    assert json.loads((run / "config.json").read_text())["plan"]["cap"] == 2  # the plan is kept as it was made


@pytest.mark.parametrize("budget, elapsed, done, epochs, epoch_seconds, final_seconds, cap, want", [
    (100, 50, 10, 20, 4.0, 1.0, 100, 20),   # 50 + 10 x 4 + 1 = 91 <= 100: on pace, the plan stands
    (100, 50, 10, 20, 4.9, 1.0, 100, 20),   # 50 + 49 + 1 = 100: still within the budget
    (100, 50, 10, 20, 5.0, 1.0, 100, 19),   # 101 > 100: as many as fit in 98 s, 47 s / 5 s = 9 more
    (100, 50, 10, 20, 10.0, 1.0, 100, 14),  # 4 more
    (100, 99, 10, 20, 1.0, 1.0, 100, 10),   # no room: stop now, with the epochs done
    (100, 50, 10, 12, 100.0, 1.0, 100, 10),
    (100, 20, 5, 20, 2.0, 1.0, 100, 42),    # ahead, in the plan's first half: as many as fit in 95 s, 74 / 2 = 37 more
    (100, 20, 5, 20, 2.0, 1.0, 30, 30),     # ... at most the cap
    (100, 20, 5, 20, 2.0, 1.0, None, 20),   # no cap given: never more
    (100, 20, 5, 20, 2.0, 1.0, 20, 20),     # a plan at its cap
    (100, 20, 10, 20, 2.0, 1.0, 100, 20),   # half the plan done: not stretched any more
    (100, 20, 5, 20, 5.0, 1.0, 100, 20),    # 20 + 75 + 1 = 96 s: within the budget, but no more fits in 95 s
    (100, 20, 5, 20, 3.7, 1.0, 100, 25),    # 74 / 3.7 = 20 more in 95 s
    (100, 20, 5, 20, 3.5, 1.0, 100, 26),
    (1000, 20, 5, 100, 9.3, 1.0, 1000, 100),  # 929 / 9.3 = 99 more: 104 epochs, 4% more than planned: it stands
    (1000, 20, 5, 100, 8.9, 1.0, 1000, 109),  # 929 / 8.9 = 104 more: 9% more
])
def test_replan_epochs_shortens_a_plan_that_would_overrun_and_lengthens_one_well_ahead(
        budget, elapsed, done, epochs, epoch_seconds, final_seconds, cap, want):
    assert train.replan_epochs(budget, elapsed, done, epochs, epoch_seconds, final_seconds, cap=cap) == want


def test_epoch_pace_is_the_lower_median_of_the_last_epochs_not_a_process_s_first():
    def pace(seconds, first_epochs):
        return train.epoch_pace([{"seconds": x} for x in seconds], first_epochs)

    assert pace([50.0, 1.0, 1.0, 30.0, 1.0, 1.0], {0, 3}) == (1.0, 4)  # each process's first left out
    assert pace([50.0, 1.0, 1.0, 30.0, 1.0, 1.0], {0}) == (1.0, 5)
    assert pace([50.0, 2.0, 4.0], {0}) == (2.0, 2)  # lower median: one slow epoch of two does not set it
    assert pace([9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0], set()) == (3.0, 5)  # the last 5 only
    assert math.isnan(pace([50.0], {0})[0]) and pace([50.0], {0})[1] == 0


def test_replan_needs_evidence_unless_the_budget_is_spent():
    """Fewer than 3 epochs of pace: no replan, unless the budget is spent (then the run stops at the epochs
    done). With 3 or more: the epochs that fit, each at the pace plus the epoch-end checkpoints (one every
    ``checkpoint_seconds``; those within an epoch are in its time already, ``checkpoint_every`` adds none)."""
    config = _config(time_budget=100.0, checkpoint_seconds=0.0, checkpoint_every=1)
    slow = [{"seconds": x} for x in (50.0, 30.0, 30.0)]
    plan = {"epochs": 20}
    assert not train._replan(plan, config, slow, {0}, 50.0, 0.5, quiet) and plan == {"epochs": 20}
    lines = []
    assert train._replan(plan, config, slow, {0}, 99.9, 0.5, lines.append)  # 99.9 + 0.5 > 100: spent
    assert plan["epochs"] == 3 and plan["replans"][0]["after_epoch"] == 3
    assert lines == ["time budget 100 s: 99.9 s after 3 epochs, 30.00 s per epoch now: 3 epochs instead of 20"]
    plan = {"epochs": 20}
    history = slow + [{"seconds": 30.0}]
    assert train._replan(plan, config, history, {0}, 40.0, 0.5, quiet)
    per_epoch = 30.0 + 0.5  # the pace, and a checkpoint at every epoch's end
    assert plan == {"epochs": 4 + 1, "replans": [{"after_epoch": 4, "epochs": 5, "elapsed_seconds": 40.0,
                                                  "epoch_seconds": per_epoch}]}  # floor((98 - 40.5) / 30.5) = 1
    plan = {"epochs": 20}
    fast = slow[:1] + [{"seconds": 1.0}] * 3
    assert not train._replan(plan, config, fast, {0}, 40.0, 0.5, quiet) and plan == {"epochs": 20}  # on pace
    plan, lines = {"epochs": 20, "cap": 500}, []  # ahead of it, with a cap above it: more epochs
    assert train._replan(plan, config, fast, {0}, 40.0, 0.5, lines.append)
    assert plan["epochs"] == 4 + 36 and plan["replans"][0]["epochs"] == 40  # floor((95 - 40.5) / 1.5) = 36
    assert lines == ["time budget 100 s: 40.0 s after 4 epochs, 1.50 s per epoch now: 40 epochs instead of 20"]


def test_a_run_slower_than_its_plan_is_replanned_to_fewer_epochs(tmp_path, mnist, monkeypatch, one_thread):
    """Planned to 6 epochs (forced) in a budget its first epoch already used up: at the end of epoch 2 the
    run sees it cannot finish in time and stops there, the learning rate having followed the 6-epoch plan
    until then; config.json, the checkpoint and the summary say 2 epochs, the plan records the replan."""
    _planned(monkeypatch, 6)
    lines = []
    summary = fit(_config(time_budget=1e-3), tmp_path / "run", progress=False, log=lines.append, data=_light(mnist))
    assert summary["epochs"] == 2 and [r["lr"] for r in _metrics(tmp_path / "run")] == [
        exponential_lr(e, 6, 1e-3, 3e-6) for e in range(2)]
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["config"]["epochs"] == 2 and written["plan"]["epochs"] == 2
    assert [(r["after_epoch"], r["epochs"]) for r in written["plan"]["replans"]] == [(2, 2)]
    assert any(line.endswith(": 2 epochs instead of 6") for line in lines)
    state = read_checkpoint_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert (state["epoch"], state["step"], state["config"]["epochs"], state["plan"]["epochs"]) == (2, 0, 2, 2)
    _, metadata = load_tensors(tmp_path / "run" / "model.safetensors")
    assert json.loads(metadata["config"])["epochs"] == 2  # the best model's file says so too


def test_a_run_faster_than_its_plan_is_replanned_to_more_epochs(tmp_path, mnist, monkeypatch, one_thread):
    """Planned to 10 epochs (forced) under a cap of 16 in a budget of 60 s that 16 of these epochs fill to
    a fraction: after epoch 4 (three epochs of pace after the first) the run plans all 16, the learning rate
    following the 10-epoch schedule until then and the 16-epoch one after; config.json, the checkpoint and
    the summary say 16 epochs, the plan records the replan."""
    _planned(monkeypatch, 10)
    lines = []
    summary = fit(_config(epochs=16), tmp_path / "run", progress=False, log=lines.append, data=_light(mnist))
    assert summary["epochs"] == 16
    schedule = [exponential_lr(e, 10, 1e-3, 3e-6) for e in range(4)]
    schedule += [exponential_lr(e, 16, 1e-3, 3e-6) for e in range(4, 16)]
    assert [r["lr"] for r in _metrics(tmp_path / "run")] == schedule
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (written["config"]["epochs"], written["plan"]["epochs"], written["plan"]["cap"]) == (16, 16, 16)
    assert [(r["after_epoch"], r["epochs"]) for r in written["plan"]["replans"]] == [(4, 16)]
    assert any(line.endswith(": 16 epochs instead of 10") for line in lines)
    state = read_checkpoint_state(tmp_path / "run" / CHECKPOINT_NAME)
    assert (state["epoch"], state["config"]["epochs"], state["plan"]["epochs"]) == (16, 16, 16)


def test_a_different_budget_is_refused_when_resuming(tmp_path, mnist, monkeypatch):
    _planned(monkeypatch, 2)
    fit(_config(), tmp_path / "run", progress=False, log=quiet, data=_light(mnist))
    with pytest.raises(ConfigError, match=r"different time_budget \(run: 60.0, asked: 30.0\)"):
        resume(tmp_path / "run", progress=False, log=quiet, data=_light(mnist), time_budget=30.0)


@pytest.mark.parametrize("value", [0, -5.0, math.nan, math.inf, True, "60"])
def test_time_budget_is_validated(value):
    with pytest.raises(ConfigError, match="time_budget must be a positive number of seconds, got "):
        small_config(time_budget=value)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "m", "5d", ""])
def test_cli_time_budget_is_validated(value, capsys):
    assert_one_line_error(["train", "mnist-float", "--time-budget", value],
                          f"argument --time-budget: expected a positive duration (540, 540s, 9m, 1.5h), got {value!r}",
                          capsys)


@pytest.mark.parametrize("value, seconds", [("540", 540.0), ("540s", 540.0), ("9m", 540.0), ("9M", 540.0),
                                            ("1.5h", 5400.0), ("2.5", 2.5), ("1e3", 1000.0), ("4.1m", 246.0),
                                            (" 9m ", 540.0)])
def test_cli_durations_take_seconds_minutes_and_hours(value, seconds):
    from binaryconnect.cli import build_parser

    args = build_parser().parse_args(["train", "mnist-float", "--time-budget", value])
    assert args.time_budget == seconds
    assert build_parser().parse_args(["sweep", "mnist-float", "--seeds", "0", "--deadline", value]).deadline == seconds


def test_cli_trains_with_a_time_budget_and_a_sweep_repeat_keeps_the_plan(tmp_path, data_root, capsys):
    """The command line passes --time-budget through. A repeated sweep with the same options finds the run
    finished (planned to 1 epoch under the cap of 500 it asks for again) and skips it; a plan that took its
    whole cap (1 epoch in a day), asked again with --epochs 2, is resumed to 2 epochs."""

    def sweep(out, epochs, budget):
        return main(["sweep", "mnist-float", "--seeds", "0", "-o", str(out), "--", "--data-dir", str(data_root),
                     "--train-subset", "500", "--hidden", "16", "--depth", "1", "--device", "cpu",
                     "--epochs", epochs, "--time-budget", budget])

    assert sweep(tmp_path / "tiny", "500", "1e-6") == 0
    config = json.loads((tmp_path / "tiny" / "mnist-float-s0" / "config.json").read_text())["config"]
    assert (config["epochs"], config["time_budget"]) == (1, 1e-6)
    capsys.readouterr()
    assert sweep(tmp_path / "tiny", "500", "1e-6") == 0
    assert "mnist-float-s0: already finished, skipped" in capsys.readouterr().out
    assert sweep(tmp_path / "day", "1", "86400") == 0
    assert sweep(tmp_path / "day", "2", "86400") == 0
    assert "mnist-float-s0: resumed" in capsys.readouterr().out
    assert json.loads((tmp_path / "day" / "mnist-float-s0" / "summary.json").read_text())["epochs"] == 2


def test_report_puts_the_seeds_of_a_budgeted_experiment_in_one_row(tmp_path, mnist, monkeypatch):
    """Two seeds planned to different numbers of epochs are one experiment (the budget is the experiment,
    not the epochs it planned); plain runs with different epochs stay two."""
    data = _light(mnist)
    for seed, epochs in ((0, 2), (1, 3)):
        _planned(monkeypatch, epochs)
        fit(_config(seed=seed), tmp_path / f"b{seed}", progress=False, log=quiet, data=data)
    for seed, epochs in ((0, 1), (1, 2)):
        fit(_config(seed=seed, epochs=epochs, time_budget=None), tmp_path / f"p{seed}", progress=False, log=quiet,
            data=data)
    groups = group_runs([read_run(tmp_path / r) for r in ("b0", "b1", "p0", "p1")])
    assert [[r.path.name for r in g.runs] for g in groups] == [["b0", "b1"], ["p0"], ["p1"]]
    assert groups[0].label == "mnist-deterministic time_budget=60.0"  # not the epochs it planned
    assert [g.label for g in groups[1:]] == [f"mnist-deterministic epochs={e}" for e in (1, 2)]
    old = tmp_path / "p1" / "config.json"  # a run directory from before time budgets: no such key, same row
    saved = json.loads(old.read_text())
    del saved["config"]["time_budget"]
    old.write_text(json.dumps(saved))
    fit(_config(seed=0, epochs=2, time_budget=None), tmp_path / "p0b", progress=False, log=quiet, data=data)
    groups = group_runs([read_run(tmp_path / r) for r in ("p0b", "p1")])
    assert [[r.path.name for r in g.runs] for g in groups] == [["p0b", "p1"]]
    assert "s0 " in format_report([read_run(tmp_path / r) for r in ("b0", "b1")]).splitlines()[1]


BASE = 10.0 + 0.5 * (500 + 1000) / 1000 + 0.5  # 10 steps at 1 s; the test set's 0.5 s rate for both sets; 0.5 s


@pytest.mark.parametrize("checkpoint_seconds, checkpoint_every, first_step, mark, written, want", [
    (30.0, None, 0, 5, 0.0, BASE + BASE / 30 * 2.0),  # a 2-s checkpoint every 30 s (BASE / 30 per epoch)
    (0.0, None, 0, 5, 0.0, BASE + 2.0),               # or, with 0, every epoch
    (30.0, 5, 0, 5, 0.0, BASE + (BASE / 30 + 1.8) * 2.0),  # and every 5 steps: 9 / 5 before the epoch's last
    (30.0, 5, 0, 5, 1.0, BASE + (BASE / 30 + 1.8) * 2.0),  # a write among the timed steps does not slow them
    (30.0, None, 6, 8, 0.0, BASE + BASE / 30 * 2.0),  # resumed at step 6: the second half of its 4 steps is timed
])
def test_first_epoch_timer_rates_the_timed_steps(monkeypatch, checkpoint_seconds, checkpoint_every, first_step,
                                                 mark, written, want):
    """The first steps (compilation, autotuning) are not timed: the steps after the middle are (in a run
    resumed later, the second half of those it trains), at their rate, less the checkpoints written among
    them (1 s each here). The validation set's evaluation (1.5 s: it autotunes) is not timed either: both
    sets are counted at the test set's rate (0.5 s for 1,000 examples). Then what followed, as it was."""
    # the clock at the mark, after the steps, after validation, after the test set, at the plan
    ticks = iter([60.0 - (10 - mark) - written, 60.0, 61.5, 62.0, 62.5])
    monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    timer = train._FirstEpochTimer(10, first_step, torch.device("cpu"))
    assert timer.mark == mark and not timer.untimed
    timer.wrote(5.0)  # before the mark: not among the timed steps
    for done in range(first_step + 1, 11):
        timer.after_step(done)
        if done == 9:
            timer.wrote(written)
    timer.trained()
    timer.validated()
    timer.tested()
    timer.wrote(7.0)  # after the steps (the epoch's end): not among them either
    config = _config(checkpoint_seconds=checkpoint_seconds, checkpoint_every=checkpoint_every)
    assert timer.epoch_seconds(2.0, config, 99.0, 500, 1000) == pytest.approx(want)
    assert next(ticks, None) is None  # each mark read the clock once


def test_a_run_resumed_after_its_first_epoch_s_last_step_counts_the_run_so_far(monkeypatch):
    """Stopped after the last step of epoch 1 (a checkpoint at step 10 of 10), resumed: no step is left to
    time, so the steps count as the run's seconds so far; evaluation and checkpoints are added as measured."""
    ticks = iter([60.0, 60.0, 61.0, 61.5, 62.0])
    monkeypatch.setattr(train, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    timer = train._FirstEpochTimer(10, 10, torch.device("cpu"))
    assert timer.untimed
    timer.trained()
    timer.validated()
    timer.tested()
    assert timer.epoch_seconds(2.0, _config(checkpoint_seconds=0.0), 40.0, 1000, 1000) == pytest.approx(
        40.0 + 1.0 + 0.5 + 2.0)


def test_each_process_s_first_epoch_is_left_out_of_the_pace(tmp_path, mnist, monkeypatch, one_thread):
    """Planned to 6 epochs, stopped in epoch 3, resumed: the pace is taken without epoch 1 (the first
    process's first) and epoch 3 (the second's, which pays for its warm-up), and the plan stands."""
    _planned(monkeypatch, 6)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at epoch 3, step 2"):
        fit(_config(), run, progress=False, log=quiet, data=_light(mnist, stop_at=14))
    seen, pace = [], train.epoch_pace

    def spy(history, first_epochs):
        seen.append((len(history), set(first_epochs)))
        return pace(history, first_epochs)

    costs, replans, replan = [], [], train._replan

    def spy_replan(plan, config, history, first_epochs, elapsed, checkpoint_seconds, log):
        costs.append(checkpoint_seconds)
        replans.append((len(history), set(first_epochs)))
        return replan(plan, config, history, first_epochs, elapsed, checkpoint_seconds, log)

    monkeypatch.setattr(train, "epoch_pace", spy)
    monkeypatch.setattr(train, "_replan", spy_replan)
    summary = resume(run, progress=False, log=quiet, data=_light(mnist))
    # after epochs 3, 4 and 5 (not after the last), for the replan and for the epoch line's time to go
    assert {(n, frozenset(first)) for n, first in seen} == {(n, frozenset({0, 2})) for n in (3, 4, 5)}
    assert replans == [(3, {0, 2}), (4, {0, 2}), (5, {0, 2})]
    # before the resumed process writes a checkpoint, a checkpoint costs what the plan measured, not nothing
    plan = json.loads((run / "config.json").read_text())["plan"]
    assert costs[0] == plan["checkpoint_seconds"] > 0
    assert summary["epochs"] == 6 and "replans" not in json.loads((run / "config.json").read_text())["plan"]
