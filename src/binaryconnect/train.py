"""The training loop: ``fit(config, run_dir)`` trains, selects the best-validation model, and writes the
run directory; ``resume(run_dir)`` continues a run from its checkpoint. Both read top to bottom in
``_run``: data -> model, optimizer, generators (from the seed, or as the checkpoint left them) ->
for each epoch (train, evaluate, keep the best, checkpoint) -> summary.

Run directory:
    config.json      the resolved configuration (a run can be repeated from it), the environment, and
                     the resumes with the options they changed
    metrics.jsonl    one JSON object per epoch: train loss, validation and test error, learning rate, seconds
    model.safetensors  the best-validation model (state_dict; the configuration in its metadata): written
                     with each checkpoint when it has changed, and by a run that fails on its way out
    checkpoint.safetensors  everything needed to continue exactly (see checkpoint.py): written at the
                     start, at the first epoch end ``checkpoint_seconds`` (default 30; 0: every epoch)
                     after the last one, after the last epoch, every ``checkpoint_every`` steps, and on
                     SIGINT/SIGTERM
    summary.json     best epoch, its validation and test error, wall time

Guarantees (each tested in tests/test_reliability_*.py): on the CPU a run killed at any point and resumed
ends bit-identical to an uninterrupted run of the same seed (model, optimizer, learning-rate position,
epoch permutation, running loss and every random generator are restored); SIGINT/SIGTERM finish the
step, write a checkpoint and raise ``TrainingInterrupted`` (exit code 130/143); a non-finite loss raises
``TrainingDiverged``, leaving the last checkpoint as it was. On the CPU the loss is checked before every
optimizer step; on a GPU, where reading it back every step would stall the device, the losses of the last
``finite_check_interval`` steps are checked together, and always before anything is written: the first
bad step is still named exactly, and no weight it touched is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from ._values import is_int
from .checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    load_model_file,
    model_metadata,
    optimizer_from_tensors,
    optimizer_to_tensors,
    remove_stale_temp_files,
    save_checkpoint,
    save_tensors,
    strip_prefix,
    with_prefix,
)
from .config import TrainConfig, keeps_plan, resume_config
from .cudagraph import GraphedStep
from .data import Splits, load_dataset, load_run_dataset
from .errors import DIVERGED_NAME, CheckpointError, ConfigError, CudaGraphError, TrainingDiverged, TrainingInterrupted
from .layers import set_generator
from .losses import square_hinge_loss
from .models import create_model
from .optim import exponential_lr, make_optimizer, set_lr
from .speed import cpu_bf16_emulated_warning, cpu_bf16_hint, training_forward


def finite_check_interval(device: torch.device) -> int:
    """Steps between two checks of the loss for NaN/Inf: every step on the CPU (free there); on an
    accelerator, every 64 steps, so that the host does not wait for the device at every step."""
    return 1 if device.type == "cpu" else 64


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def _model_options(config: TrainConfig) -> dict:
    return dict(binarization=config.binarization, H=config.H, ste=config.ste, stochastic_eval=config.stochastic_eval,
                **config.model_kwargs)


def check_model_options(config: TrainConfig) -> None:
    """ConfigError unless ``config.model`` is registered and takes ``config.model_kwargs`` (by name)."""
    from .models import check_model_options as check

    try:
        check(config.model, partial=True, **_model_options(config))  # input_shape, num_classes: from the data
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network ``config`` names, for inputs of ``input_shape``."""
    try:
        return create_model(config.model, input_shape=input_shape, num_classes=num_classes, **_model_options(config))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             samples: int = 1) -> tuple[float, float]:
    """``(error rate, mean square hinge loss)`` of ``model`` in eval mode on ``(x, y)``.

    With ``samples > 1`` the outputs of that many forward passes are averaged (for stochastic layers
    evaluating with sampled binary weights, ``stochastic_eval="sample"``).
    """
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.int64, device=x.device)
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        out = model(xb).float()
        for _ in range(samples - 1):
            out += model(xb).float()
        out /= samples
        wrong += (out.argmax(1) != yb).sum()
        loss += square_hinge_loss(out, yb).double() * len(xb)
    model.train(was_training)
    return wrong.item() / len(x), loss.item() / len(x)


def _environment(device: torch.device) -> dict:
    env = {"binaryconnect": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads(),
           "working_dir": os.getcwd()}  # relative dataset paths are found from it (data.load_dataset)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def run_working_dir(info: dict) -> str | None:
    """The folder a run was started from, as its config.json, checkpoint or model file's metadata (``info``)
    records it; None when it does not (a run from before it was recorded, a damaged record)."""
    found = info.get("working_dir")
    if found is None and isinstance(info.get("environment"), dict):
        found = info["environment"].get("working_dir")
    return found if isinstance(found, str) and found else None


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


#: The share of a time budget that planned epochs may fill: the rest absorbs epoch-to-epoch variation.
BUDGET_MARGIN = 0.98


def plan_epochs(budget: float, elapsed: float, epoch_seconds: float, final_seconds: float, cap: int,
                margin: float = BUDGET_MARGIN) -> int:
    """The number of epochs, the first (already trained) included, that a run with a time budget trains:
    as many as fit, at ``epoch_seconds`` each, in ``margin * budget`` seconds after the ``elapsed`` ones and
    the ``final_seconds`` of the last checkpoint; at least 1, at most ``cap`` (the configured epochs)."""
    if epoch_seconds <= 0:
        return cap
    return _epochs_that_fit(budget, elapsed, 1, cap, epoch_seconds, final_seconds, margin)


def _epochs_that_fit(budget: float, elapsed: float, done: int, most: int, epoch_seconds: float,
                     final_seconds: float, margin: float) -> int:
    """``done`` epochs and as many more, at ``epoch_seconds`` each, as fit in ``margin * budget`` seconds after
    the ``elapsed`` ones and the ``final_seconds`` of the last checkpoint; from ``done`` to ``most``."""
    room = margin * budget - elapsed - final_seconds
    return max(done, min(most, done + math.floor(room / epoch_seconds)))


class _FirstEpochTimer:
    """Times the first epoch of a run with a time budget, for ``plan_epochs``: the steps of its second half
    (the first ones pay for compilation, CUDA-graph recording and cuDNN's autotuning; in a run resumed past
    the middle, the second half of the steps this process trains), without the checkpoints written among
    them; the evaluation of the test set, which follows the validation set's and so finds its kernels
    chosen (cuDNN autotunes each new shape once), for both sets; then what follows (the best model's copy,
    metrics). The device is synchronized at each mark: queued GPU work counts."""

    def __init__(self, steps: int, first_step: int, device: torch.device) -> None:
        self.steps, self.device = steps, device
        self.mark = max(steps // 2, first_step + (steps - first_step) // 2)  # steps done when the clock starts
        # resumed with at most one step to go: no warmed-up step to time (the run so far stands for them)
        self.untimed = first_step > 0 and self.mark == first_step
        self.t_mark = self._now() if first_step >= self.mark else None
        self.t_trained = self.t_validated = self.t_tested = math.nan
        self.writing = 0.0  # seconds of checkpoint writes between the mark and the end of the steps

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def after_step(self, steps_done: int) -> None:
        if steps_done == self.mark and self.t_mark is None:
            self.t_mark = self._now()

    def wrote(self, seconds: float) -> None:
        """A checkpoint took ``seconds`` to write; those among the timed steps are taken out of their time."""
        if self.t_mark is not None and math.isnan(self.t_trained):
            self.writing += seconds

    def trained(self) -> None:
        self.t_trained = self._now()

    def validated(self) -> None:
        self.t_validated = self._now()

    def tested(self) -> None:
        self.t_tested = self._now()

    def epoch_seconds(self, checkpoint_seconds: float, config: TrainConfig, elapsed: float, n_val: int,
                      n_test: int) -> float:
        """Seconds per epoch from now on: the steps at the timed ones' rate, the ``n_val`` validation and
        ``n_test`` test examples at the test set's rate, the rest as measured, and the checkpoints an epoch
        writes (``checkpoint_seconds`` each): every ``checkpoint_every`` steps within it,
        and at its end one every ``config.checkpoint_seconds`` seconds (0: every epoch). A run resumed with
        no step left to time counts its steps as the ``elapsed`` seconds of the run so far (an overestimate:
        they include the run's start)."""
        if self.untimed:  # (mark == steps only after a resume at the epoch's last step: untimed)
            train = elapsed
        else:
            train = (self.t_trained - self.t_mark - self.writing) / (self.steps - self.mark) * self.steps
        evaluation = (self.t_tested - self.t_validated) / n_test * (n_val + n_test)
        base = train + evaluation + (time.perf_counter() - self.t_tested)
        within = (self.steps - 1) / config.checkpoint_every if config.checkpoint_every else 0.0
        return base + (_epoch_end_checkpoints(base, config) + within) * checkpoint_seconds


def _epoch_end_checkpoints(epoch_seconds: float, config: TrainConfig) -> float:
    """Checkpoints per epoch written at epoch ends, for epochs of ``epoch_seconds``: one every
    ``config.checkpoint_seconds`` seconds (0: every epoch). (Those every ``checkpoint_every`` steps come on
    top, within the epochs.)"""
    return 1.0 if config.checkpoint_seconds == 0 else min(1.0, epoch_seconds / config.checkpoint_seconds)


def _say_if_first_epoch_overruns(budget: float, elapsed: float, done: int, steps: int, log) -> None:
    """Log a line when the first epoch's training alone, at the pace of its first ``done`` of ``steps`` steps
    (``elapsed`` seconds of the run), will take longer than the time budget: the plan comes at the end of
    the epoch, which is trained whole, so the budget is overrun; said at half the epoch instead of after it."""
    if done <= 0:
        return
    projected = elapsed * steps / done
    if projected > budget:
        log(f"the first epoch's first {done} of {steps} steps took {elapsed:.0f} s: the epoch alone takes about "
            f"{projected:.0f} s of training (its evaluation apart), past the time budget of {budget:g} s; it is "
            "trained whole, since a budget is not a deadline (Ctrl-C stops the run at a step, with a checkpoint)")


def _plan(config: TrainConfig, timer: _FirstEpochTimer, elapsed: float, checkpoint_seconds: float, data: Splits,
          log) -> dict:
    """The plan of a run with a time budget, made at the end of its first epoch (``elapsed`` seconds of
    training so far): the epochs it trains, the cap they were planned under, the measurements; and a line
    saying why."""
    per_epoch = timer.epoch_seconds(checkpoint_seconds, config, elapsed, len(data.val_x), len(data.test_x))
    cap = config.epochs
    epochs = plan_epochs(config.time_budget, elapsed, per_epoch, checkpoint_seconds, cap)
    log(f"time budget {config.time_budget:g} s: {elapsed:.1f} s so far, {per_epoch:.2f} s per epoch from now on "
        f"(checkpoint {checkpoint_seconds:.2f} s): {_epochs(epochs)}"
        + (" (all of the --epochs cap)" if epochs == cap else f" of at most {cap}")
        + (f"; the first epoch alone took {elapsed:.0f} s of the budget" if epochs == 1 < cap else ""))
    return {"epochs": epochs, "cap": cap, "elapsed_seconds": elapsed, "epoch_seconds": per_epoch,
            "checkpoint_seconds": checkpoint_seconds}


#: The share of a time budget a replan may lengthen a plan to fill (below ``BUDGET_MARGIN``: a plan is
#: shortened only past the whole budget), and the least it lengthens it by, as a share of the plan: a pace
#: wandering by a few percent changes neither the plan nor, with it, the learning-rate schedule.
EXTEND_MARGIN, EXTEND_AT_LEAST = 0.95, 0.05


def replan_epochs(budget: float, elapsed: float, done: int, epochs: int, epoch_seconds: float,
                  final_seconds: float, margin: float = BUDGET_MARGIN, cap: int | None = None,
                  extend_margin: float = EXTEND_MARGIN) -> int:
    """A planned run's epochs after ``done`` of them, ``elapsed`` seconds in, its epochs now taking
    ``epoch_seconds``. If the rest would end past the budget: as many as fit in ``margin * budget``, at
    least ``done``. If the run is ahead of its plan, still in the first half of it, and ``EXTEND_AT_LEAST``
    of the plan more (one epoch at least) fit in ``extend_margin * budget``: as many as fit there, at most
    ``cap`` (the --epochs the plan was made under; None: never more). Else ``epochs``, the plan: the band
    between the margins keeps a run from replanning at every epoch, and late in a run, where the learning
    rate has nearly reached its end, the plan is not stretched."""
    if not epoch_seconds > 0:
        return epochs
    if elapsed + (epochs - done) * epoch_seconds + final_seconds > budget:
        return _epochs_that_fit(budget, elapsed, done, epochs, epoch_seconds, final_seconds, margin)
    if cap is not None and epochs < cap and 2 * done < epochs:
        more = _epochs_that_fit(budget, elapsed, done, cap, epoch_seconds, final_seconds, extend_margin)
        if more - epochs >= max(1.0, EXTEND_AT_LEAST * epochs):
            return more
    return epochs


#: The epochs a replan takes the pace from: the last ones, at most this many, at least ``REPLAN_EVIDENCE``
#: (fewer: no replan, unless the budget is already spent).
REPLAN_WINDOW, REPLAN_EVIDENCE = 5, 3


def epoch_pace(history: list[dict], first_epochs: set[int]) -> tuple[float, int]:
    """The pace of a run: the lower median of the seconds of its last ``REPLAN_WINDOW`` epochs (``history``,
    0-based) that are not in ``first_epochs`` (the first epoch each process trained, which pays for its
    warm-up); and how many epochs that took. The lower median: one slow epoch among two does not set it."""
    recent = sorted([r["seconds"] for i, r in enumerate(history) if i not in first_epochs][-REPLAN_WINDOW:])
    return (recent[(len(recent) - 1) // 2] if recent else math.nan), len(recent)


def _replan(plan: dict, config: TrainConfig, history: list[dict], first_epochs: set[int], elapsed: float,
            checkpoint_seconds: float, log) -> bool:
    """At the end of an epoch after the first of a planned run: if the epochs left, at the run's pace
    (``epoch_pace``; at least ``REPLAN_EVIDENCE`` epochs of it), would end past the budget, plan fewer; if
    the run is well ahead of its plan in the plan's first half, plan more, up to the cap (``replan_epochs``;
    ``plan["epochs"]``, each replan recorded in ``plan["replans"]``); a run already past its budget stops.
    The learning rate then follows the schedule of the new number of epochs, decaying to ``lr_end`` at the
    new last epoch, as when a resumed run is given other epochs. Return whether it replanned."""
    done = len(history)
    pace, n = epoch_pace(history, first_epochs)
    if elapsed + checkpoint_seconds > config.time_budget:
        epochs, per_epoch = done, pace  # spent: stop now, whatever the pace
    elif n < REPLAN_EVIDENCE:
        return False
    else:  # (a metrics record's seconds hold the checkpoints written within its epoch, not the one at its end)
        per_epoch = pace + _epoch_end_checkpoints(pace, config) * checkpoint_seconds
        epochs = replan_epochs(config.time_budget, elapsed, done, plan["epochs"], per_epoch, checkpoint_seconds,
                               cap=plan.get("cap"))
    if epochs == plan["epochs"]:
        return False
    log(f"time budget {config.time_budget:g} s: {elapsed:.1f} s after {_epochs(done)}, {per_epoch:.2f} s per epoch "
        f"now: {_epochs(epochs)} instead of {plan['epochs']}")
    plan.setdefault("replans", []).append({"after_epoch": done, "epochs": epochs, "elapsed_seconds": elapsed,
                                           "epoch_seconds": per_epoch})
    plan["epochs"] = epochs
    return True


def _first_epochs(resumes: list[dict]) -> set[int]:
    """The first epoch (0-based) each process of a run trained: the run's start and every resume."""
    return {0, *(r["epoch"] for r in resumes)}


#: The least time to go that the epoch log line mentions (seconds).
TIME_TO_GO_FROM = 60.0


def _time_to_go(epochs_left: int, history: list[dict], resumes: list[dict]) -> str:
    """``, about 6.4 days to go`` for the epoch log line: ``epochs_left`` at the run's pace (``epoch_pace``,
    without each process's first epoch, which pays for its warm-up; after the first epoch alone, its time);
    empty when none are left, when they take less than ``TIME_TO_GO_FROM``, or when the only epoch timed is
    the rest of one a resumed process began in its middle."""
    if epochs_left <= 0:
        return ""
    pace, n = epoch_pace(history, _first_epochs(resumes))
    if not n:
        if resumes and resumes[-1]["step"] > 0 and resumes[-1]["epoch"] == len(history) - 1:
            return ""
        pace = history[-1]["seconds"]
    seconds = epochs_left * pace
    return f", about {_span(seconds)} to go" if seconds >= TIME_TO_GO_FROM else ""


def _span(seconds: float) -> str:
    """A duration as people say it: ``45 s``, ``12 min``, ``3.5 h``, ``6.4 days`` (each unit up to the
    rounded value at which the next takes over)."""
    if round(seconds) < 90:
        return f"{round(seconds)} s"
    if round(seconds / 60) < 90:
        return f"{round(seconds / 60)} min"
    if round(seconds / 3600, 1) < 48:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' * (n != 1)}"


@dataclass
class _Progress:
    """Where a run stands, besides model, optimizer and generators: what a checkpoint adds to them."""

    epoch: int = 0  # the epoch in progress (0-based); equals config.epochs once the run is complete
    step: int = 0  # steps of that epoch done; 0: the epoch has not started (no permutation drawn yet)
    global_step: int = 0
    lr: float = math.nan  # the epoch's learning rate (before the per-layer scales)
    perm: torch.Tensor | None = None  # the epoch's permutation of the training set (CPU, int64)
    loss_sum: torch.Tensor | None = None  # sum of the epoch's training losses so far (float64)
    best: dict = field(default_factory=lambda: {"epoch": -1, "val_error": math.inf, "test_error": math.nan})
    best_model: dict[str, torch.Tensor] | None = None  # CPU copy of the best-validation state_dict
    best_metadata: dict[str, str] | None = None  # its model-file metadata
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records
    seconds: float = 0.0  # training time spent by earlier processes of this run


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM become a request to stop cleanly: ``signum`` is set, the loop finishes
    its step, writes a checkpoint and raises ``TrainingInterrupted``. Further signals while stopping are
    noted and ignored, so a second Ctrl-C cannot interrupt the checkpoint being written (SIGKILL still
    can; the atomic write then leaves the previous checkpoint). Handlers are installed in the main thread
    only, and the previous ones restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may run inside a print, and buffered streams are not reentrant
        if self.signum is None:
            self.signum = signum
            _note(f"binaryconnect: {signal.Signals(signum).name} received: stopping after this step, "
                  "writing a checkpoint\n")
        else:
            _note("binaryconnect: already stopping: the checkpoint is being written, please wait\n")


def _note(text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.write(sys.stderr.fileno(), text.encode())


@contextlib.contextmanager
def _algorithms(deterministic: bool, device: torch.device):
    """While training: ``torch.use_deterministic_algorithms(True)`` when asked; otherwise, on a GPU, cuDNN
    autotuning (``cudnn.benchmark``: each convolution shape timed once, the fastest algorithm kept, as
    ``bench/bench_train_step.py`` times it). Both settings are restored afterwards. On a GPU the training
    device is also the current device meanwhile (CUDA graphs record and replay on the current device)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if deterministic:
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        on_gpu = device.type == "cuda" and torch.cuda.is_available()
        with torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


@contextlib.contextmanager
def _on_error(action, log):
    """Run ``action()`` when the block raises, then let the exception go on; an error of ``action`` itself
    is logged, never raised in its place."""
    try:
        yield
    except BaseException:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log(f"note: could not write the best model on the way out ({exc!r})")
        raise


def _data_fingerprint(data: Splits) -> str:
    """SHA-256 (16 hex digits) of the splits' shapes and dtypes, all labels and the first 256 training
    images: a resumed run must train on the data the run started with."""
    h = hashlib.sha256()
    for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        t = getattr(data, name)
        h.update(f"{name}{tuple(t.shape)}{t.dtype};".encode())
    for t in (data.train_y, data.val_y, data.test_y, data.train_x[:256]):
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_dataset(config: TrainConfig, meta: dict[str, str], data_dir: str | None, what: str) -> Splits:
    """The dataset of a trained run (``config``, its model file's ``meta``) for a command on it (evaluate,
    export): from ``data_dir`` (its --data-dir) or where the run's data are (``data.load_run_dataset``), with
    the run's preprocessing; a warning when they are not the data it was trained on (``what`` then is
    measured on other data)."""
    data = load_run_dataset(config.dataset, data_dir, config.data_dir, run_working_dir(meta), val_size=config.val_size,
                            download=False, **config.dataset_kwargs)
    warn_if_other_data(data, config.dataset, config.train_subset, meta.get("data_fingerprint"), what)
    return data


def warn_if_other_data(data: Splits, dataset: str, train_subset, recorded, what: str) -> None:
    """Warn when ``data`` (loaded for a run on ``dataset`` with ``train_subset``, which is taken here) are not
    the data the run was trained on, by ``_data_fingerprint`` against ``recorded`` (from the model file or
    the packed file; nothing to compare for files from before it was recorded): a relative path that found
    another folder, other data under the same name."""
    if not isinstance(recorded, str) or not recorded:
        return
    found = _data_fingerprint(data.subset_train(train_subset) if is_int(train_subset) and train_subset > 0 else data)
    if found != recorded:
        warnings.warn(f"the {dataset} data found are not those the run was trained on (fingerprint "
                      f"{found}, trained on {recorded}): {what} is measured on other data; "
                      "--data-dir chooses the folder", stacklevel=2)


def fit(config: TrainConfig, run_dir: str | Path, progress: bool | None = None, log=print,
        data: Splits | None = None) -> dict:
    """Train ``config`` from scratch and write the run directory ``run_dir``; return the summary dictionary.

    ``data`` may be passed to reuse already loaded splits (tests); otherwise the dataset is loaded from
    ``config.data_dir``. ``progress`` shows a bar per epoch (default: when stderr is a terminal).
    """
    config.validate()
    return _run(config, Path(run_dir), progress, log, data)


def resume(run_dir: str | Path, progress: bool | None = None, log=print, data: Splits | None = None,
           **overrides) -> dict:
    """Continue the run in ``run_dir`` from its ``checkpoint.safetensors``; return the summary dictionary.

    ``overrides`` are configuration options as for ``recipe_config`` (None: unchanged). Only those in
    ``config.RESUME_MAY_CHANGE`` (epochs, device ...) may differ from the run's; they are recorded in
    ``config.json``. A run with a time budget has planned its epochs after the first (``plan`` in
    config.json): given again with the same budget and the cap the plan was made under (as a repeated sweep
    gives them), ``epochs`` changes nothing; any other ``epochs`` is the new number of epochs, as for any
    run. Anything else that differs (architecture, binarization, dataset, seed ...), or training data that
    differ from the run's, is refused with a message saying what differs.
    """
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT_NAME
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} does not exist (or is not a directory): --resume takes the run directory "
                              "`binaryconnect train` wrote")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} holds no {CHECKPOINT_NAME}: nothing to resume "
                              "(is it a binaryconnect run directory?)")
    tensors, state = load_checkpoint(path)
    try:
        saved = TrainConfig.from_dict(state["config"]).validate()
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} holds an unusable configuration ({exc})") from None
    if keeps_plan(state.get("plan"), saved.time_budget, overrides.get("time_budget"), overrides.get("epochs")):
        overrides["epochs"] = None  # the cap the plan was made under, given again (a repeated sweep): it stands
    try:
        config, changes = resume_config(saved, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"cannot resume {run_dir}: {exc}") from None
    finished = _finished_summary(run_dir)
    if finished is not None and state.get("epoch") == config.epochs and state.get("step") == 0:
        log(f"{run_dir} already finished its {config.epochs} epochs (test error {100 * finished['test_error']:.2f}% "
            f"at best validation epoch {finished['best_epoch']}): nothing to do; pass a larger --epochs to train "
            "it further")
        return finished
    remove_stale_temp_files(run_dir)
    return _run(config, run_dir, progress, log, data, checkpoint=(tensors, state), changes=changes,
                data_dir_given=overrides.get("data_dir") is not None)


def _finished_summary(run_dir: Path) -> dict | None:
    """The summary of a finished run (its summary.json), None if there is none or it is unreadable."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return summary if {"test_error", "best_epoch"} <= summary.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _check_cuda_graph(config: TrainConfig, device: torch.device) -> None:
    """Refuse ``cuda_graph`` off a GPU before anything is loaded."""
    if config.cuda_graph and device.type != "cuda":
        raise ConfigError(f"--cuda-graph records the training step as CUDA graphs and needs a CUDA device; this "
                          f"run's device is {device}: drop --cuda-graph (or --no-cuda-graph when resuming)")


def _run(config: TrainConfig, run_dir: Path, progress: bool | None, log, data: Splits | None,
         checkpoint: tuple[dict, dict] | None = None, changes: dict | None = None,
         data_dir_given: bool = True) -> dict:
    """The training run behind ``fit`` (``checkpoint`` None) and ``resume`` (a loaded checkpoint;
    ``data_dir_given``: whether the resume was given a --data-dir, else the run's data are looked for as
    ``data.run_data_roots`` says)."""
    config = dataclasses.replace(config)  # a time budget sets its epochs: the caller's object stays as it was
    if config.data_dir is not None:  # recorded absolute: later commands find it from any folder
        config.data_dir = os.path.abspath(os.path.expanduser(config.data_dir))
    device = resolve_device(config.device)
    _check_cuda_graph(config, device)
    if progress is None:
        progress = sys.stderr.isatty()

    check_model_options(config)  # a model option's typo, before minutes of data loading

    # --- data, on the training device once ---
    started_in = None if checkpoint is None else run_working_dir(checkpoint[1])  # a resume finds its data from it
    if data is None and checkpoint is not None and not data_dir_given:  # a resume: where the run's data are
        data = load_run_dataset(config.dataset, None, config.data_dir, started_in, val_size=config.val_size,
                                download=config.download, **config.dataset_kwargs)
    elif data is None:
        data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, download=config.download,
                            working_dir=started_in, **config.dataset_kwargs)
    if config.train_subset is not None:
        if config.train_subset > len(data.train_x):
            raise ConfigError(f"train_subset {config.train_subset} is more than the {len(data.train_x)} training "
                              f"examples of {config.dataset}: give at most {len(data.train_x)}, or drop --train-subset")
        data = data.subset_train(config.train_subset)
    fingerprint = _data_fingerprint(data)
    data = data.to(device)
    n_train = len(data.train_x)
    steps = n_train // config.batch_size
    if steps == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {n_train} training examples")

    # --- model, optimizer, random generators (all from the seed) ---
    torch.manual_seed(config.seed)
    model = build_model(config, data.input_shape, data.num_classes).to(device)
    optimizer = make_optimizer(model, config.lr_start, config.lr_scale)
    generators = {"shuffle": torch.Generator().manual_seed(config.seed),
                  "binarize": torch.Generator(device=device).manual_seed(config.seed + 1),
                  "augment": torch.Generator(device=device).manual_seed(config.seed + 2)}
    set_generator(model, generators["binarize"])
    forward = training_forward(model, config.amp, config.channels_last, config.compile,  # speed options
                               config.compile_mode, autocast_cache=not config.cuda_graph)
    p = _Progress()
    info = {"config": config.to_dict(), "data_fingerprint": fingerprint, "environment": _environment(device),
            "resumes": []}

    # --- resuming: all of it exactly as the checkpoint left it ---
    if checkpoint is not None:
        p, info = _restore(checkpoint, info, changes or {}, model, optimizer, generators, log)
        if config.epochs < p.epoch or (config.epochs == p.epoch and p.step > 0):
            raise ConfigError(f"the run has already trained {p.epoch + (p.step > 0)} epochs; "
                              f"ask for at least that many (--epochs), got {config.epochs}")
        changed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in (changes or {}).items())
        log(f"resuming at epoch {p.epoch + 1}, step {p.step} (global step {p.global_step})"
            + (f"; changed: {changed}" if changed else ""))

    # --- run directory: the checkpoint first, so that any run directory with files in it can be resumed ---
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DIVERGED_NAME).unlink(missing_ok=True)  # a diverged run tried again (if it diverges again: rewritten)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    start = time.perf_counter()
    last_saved = f"epoch {p.epoch + 1}, step {p.step}"
    saved_at = time.perf_counter()  # when the checkpoint on disk was written (or read)

    # --- the NaN/Inf guard: losses since the last check, checked every `check_every` steps, before any write ---
    check_every = finite_check_interval(device)
    window = torch.zeros(check_every, device=device)
    pending = {"n": 0, "first": 0}  # losses in the window; the epoch step of the first (0-based)

    def check_finite(epoch: int, before_step: bool) -> None:
        """Raise TrainingDiverged if a loss of the window is NaN/Inf: ``before_step``, before the optimizer
        step of the window's last step; else after it (before a checkpoint or the epoch's evaluation)."""
        n, first = pending["n"], pending["first"]
        pending["n"] = 0
        if n == 0 or torch.isfinite(window[:n]).all():
            return
        bad = int((~torch.isfinite(window[:n])).nonzero()[0])
        value, where = window[bad].item(), f"epoch {epoch + 1}, step {first + bad + 1}"
        if before_step and bad == n - 1:
            when = "training stopped before the optimizer step"
        else:
            when = (f"detected {'before the optimizer step of' if before_step else 'after'} step {first + n} (on "
                    f"{device.type} the loss is checked every {check_every} steps, not to stall the device, and "
                    "before anything is written); nothing was saved since")
        message = (f"loss became {value} at {where}: {when}; the last good checkpoint ({last_saved}) is untouched "
                   f"in {checkpoint_path}. Lower the learning rate (--lr-start) or check the data.")
        try:  # what a repeated sweep reads, so as not to resume a run that would diverge again
            atomic_write_json(run_dir / DIVERGED_NAME, {"epoch": epoch + 1, "step": first + bad + 1,
                                                        "loss": str(value), "message": message})
        except OSError as exc:
            log(f"note: could not write {run_dir / DIVERGED_NAME} ({exc.strerror or exc})")
        raise TrainingDiverged(message)

    best_written = None  # the best model model.safetensors holds (written with checkpoints, not per epoch)
    # seconds the last checkpoint (and best model) took to write, for a time budget: a resumed run starts from
    # what its plan measured
    checkpoint_cost = float(info.get("plan", {}).get("checkpoint_seconds", 0.0))
    timer: _FirstEpochTimer | None = None  # a time budget's, during the first epoch

    def write_best_model() -> None:
        """model.safetensors := the best model so far, if it changed since it was last written."""
        nonlocal best_written
        if p.best_model is not None and best_written is not p.best_model:
            save_tensors(run_dir / "model.safetensors", p.best_model, p.best_metadata)
            best_written = p.best_model

    def write_checkpoint(epoch: int) -> None:
        nonlocal last_saved, saved_at, checkpoint_cost
        check_finite(epoch, before_step=False)
        t = time.perf_counter()
        _save(checkpoint_path, p, info, model, optimizer, generators, p.seconds + t - start)
        last_saved = f"epoch {p.epoch + 1}, step {p.step}"
        write_best_model()  # the checkpoint's best model
        saved_at = time.perf_counter()
        checkpoint_cost = saved_at - t
        if timer is not None:
            timer.wrote(checkpoint_cost)

    planning = config.time_budget is not None and p.epoch == 0  # the epochs are planned after the first
    if checkpoint is None or planning:  # at step 0: a run can be resumed from its very start (and a plan to
        write_checkpoint(p.epoch)  # come knows what a checkpoint costs, resumed or not)
    atomic_write_json(run_dir / "config.json", _config_json(info))
    metrics_path = run_dir / "metrics.jsonl"
    atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in p.history).encode())
    write_best_model()  # resuming: the checkpoint's best model (a crash may have left another one)
    (run_dir / "summary.json").unlink(missing_ok=True)  # a resumed run is not finished until it says so
    n_params = sum(prm.numel() for prm in model.parameters())
    log(f"training {config.recipe or config.model} ({config.binarization}) on {config.dataset}: "
        f"{n_train} train / {len(data.val_x)} val / {len(data.test_x)} test, {n_params:,} parameters, "
        + (f"at most {_epochs(config.epochs)} in {config.time_budget:g} s (planned after the first)" if planning
           else _epochs(config.epochs)) + f", device {device}, run dir {run_dir}")
    hint = cpu_bf16_hint(model, device, config.amp)
    if hint:
        log(hint)
    emulated = cpu_bf16_emulated_warning(device, config.amp)
    if emulated:
        warnings.warn(emulated, stacklevel=2)

    # a run that fails (a NaN loss, an error) leaves the best model of its finished epochs: each passed the
    # NaN/Inf check before it was evaluated, so no weight a bad step touched is in it
    with _algorithms(config.deterministic, device), _StopSignals() as stop, _on_error(write_best_model, log):
        # --- CUDA graphs: recorded with the algorithm settings above, once the model, optimizer and
        # generators are as training starts from (the warm-up and recording count in the wall time) ---
        graph = None
        if config.cuda_graph:
            sample = slice(0, config.batch_size)
            try:
                graph = GraphedStep(lambda x, y: square_hinge_loss(forward(x), y), model, optimizer,
                                    data.train_x[sample], data.train_y[sample], generators=[generators["binarize"]])
            except CudaGraphError as exc:  # nothing trained since the checkpoint (the warm-up was taken back)
                # a resume's other options (more --epochs ...) are not in the checkpoint: they must be given again
                again = (f"`binaryconnect train --resume {run_dir} --no-cuda-graph`" if checkpoint is None else
                         "the same resume again with --no-cuda-graph (and the other options given to this one)")
                raise CudaGraphError(f"{exc}. {checkpoint_path} (epoch {p.epoch + 1}, step {p.step}) is intact: "
                                     f"{again} trains the run without CUDA graphs (--compile keeps part of the "
                                     "speed)") from exc

        epoch = p.epoch
        while epoch < config.epochs:  # (a time budget sets config.epochs after the first epoch)
            t0 = time.perf_counter()
            timer = _FirstEpochTimer(steps, p.step, device) if planning else None
            if p.step == 0:  # a new epoch: its learning rate, its permutation of the training set
                p.lr = exponential_lr(epoch, config.epochs, config.lr_start, config.lr_end)
                p.perm = torch.randperm(n_train, generator=generators["shuffle"])
                p.loss_sum = torch.zeros((), dtype=torch.float64)
            set_lr(optimizer, p.lr)
            perm, loss_sum = p.perm.to(device), p.loss_sum.to(device)

            # --- train: shuffled mini-batches sliced on the device (last partial batch dropped) ---
            model.train()
            of = f"at most {config.epochs}, planned after this one" if planning else config.epochs
            for step in _progress(range(p.step, steps), steps - p.step, f"epoch {epoch + 1}/{of}", progress):
                idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
                if graph is not None:  # the batch into the graph's inputs, one replay for the passes
                    graph.gather(data.train_x, data.train_y, idx, data.train_transform, generators["augment"])
                    loss = graph.forward_backward()
                else:
                    xb = data.train_x[idx]
                    if data.train_transform is not None:
                        xb = data.train_transform(xb, generators["augment"])
                    loss = square_hinge_loss(forward(xb), data.train_y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                if pending["n"] == 0:
                    pending["first"] = step
                window[pending["n"]] = loss.detach()
                pending["n"] += 1
                if pending["n"] == check_every:  # before the step: with an interval of 1, a bad loss changes nothing
                    check_finite(epoch, before_step=True)
                graph.step() if graph is not None else optimizer.step()  # also clips the latent weights to [-H, H]
                loss_sum += loss.detach()
                p.step, p.global_step = step + 1, p.global_step + 1
                if timer is not None:
                    timer.after_step(p.step)
                    if p.step == timer.mark:  # half the first epoch done: does the epoch alone overrun the budget?
                        _say_if_first_epoch_overruns(config.time_budget, p.seconds + time.perf_counter() - start,
                                                     p.step, steps, log)
                every = config.checkpoint_every
                if stop.signum or (every and p.global_step % every == 0 and p.step < steps):
                    p.loss_sum = loss_sum
                    write_checkpoint(epoch)
                    if stop.signum:
                        raise _interrupted(stop.signum, f"at epoch {epoch + 1}, step {p.step}", checkpoint_path)
            p.loss_sum = loss_sum
            check_finite(epoch, before_step=False)  # the epoch's last losses, before evaluating and saving
            if timer is not None:
                timer.trained()

            # --- evaluate; keep the best-validation model ---
            val_error, _ = evaluate(model, data.val_x, data.val_y, config.eval_batch_size, config.eval_samples)
            if timer is not None:
                timer.validated()
            test_error, _ = evaluate(model, data.test_x, data.test_y, config.eval_batch_size, config.eval_samples)
            if timer is not None:
                timer.tested()
            record = {"epoch": epoch + 1, "lr": p.lr, "train_loss": loss_sum.item() / steps,
                      "val_error": val_error, "test_error": test_error, "seconds": time.perf_counter() - t0}
            if val_error <= p.best["val_error"]:  # ties go to the later epoch, as in the original code
                p.best = {"epoch": epoch + 1, "val_error": val_error, "test_error": test_error}
                p.best_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                p.best_metadata = model_metadata(config.to_dict(), epoch=str(epoch + 1),
                                                 input_shape=json.dumps(list(data.input_shape)),
                                                 num_classes=str(data.num_classes),
                                                 working_dir=run_working_dir(info) or "",
                                                 data_fingerprint=fingerprint)
            record["best_epoch"] = p.best["epoch"]
            p.history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            elapsed, planned = p.seconds + time.perf_counter() - start, False
            if timer is not None:  # the time budget: how many epochs fit, this one included
                info["plan"] = _plan(config, timer, elapsed, checkpoint_cost, data, log)
                planning, timer, planned = False, None, True
            elif "plan" in info and info["plan"]["epochs"] == config.epochs > epoch + 1:  # on its plan (not given
                # other --epochs when resumed), epochs to go: if off the plan's pace, fewer
                planned = _replan(info["plan"], config, p.history, _first_epochs(info["resumes"]), elapsed,
                                  checkpoint_cost, log)
            if planned:
                config.epochs = info["plan"]["epochs"]
                info["config"] = config.to_dict()  # the planned epochs: what checkpoints and config.json hold
                atomic_write_json(run_dir / "config.json", _config_json(info))
                if p.best_metadata is not None:  # and the best model's file, when next written
                    p.best_metadata = {**p.best_metadata, "config": json.dumps(info["config"], sort_keys=True)}
                    best_written = None
            log(f"epoch {epoch + 1:4d}/{config.epochs}  lr {p.lr:.2e}  loss {record['train_loss']:.4f}  "
                f"val {100 * val_error:.2f}%  test {100 * test_error:.2f}%  ({record['seconds']:.1f}s"
                f"{_time_to_go(config.epochs - epoch - 1, p.history, info['resumes'])})")
            p.epoch, p.step, p.perm, p.loss_sum = epoch + 1, 0, None, None
            if (stop.signum or epoch + 1 == config.epochs
                    or time.perf_counter() - saved_at >= config.checkpoint_seconds
                    or (config.checkpoint_every and p.global_step % config.checkpoint_every == 0)):  # (a step
                write_checkpoint(epoch)  # count of --checkpoint-every that ends an epoch is written here)
            if stop.signum:
                raise _interrupted(stop.signum, f"after epoch {epoch + 1}", checkpoint_path)
            epoch += 1

    best = p.best
    summary = {"recipe": config.recipe, "binarization": config.binarization, "seed": config.seed,
               "epochs": config.epochs, "best_epoch": best["epoch"], "best_val_error": best["val_error"],
               "test_error": best["test_error"], "wall_seconds": p.seconds + time.perf_counter() - start,
               "device": str(device), "run_dir": str(run_dir)}
    atomic_write_json(run_dir / "summary.json", summary)
    log(f"done: test error {100 * best['test_error']:.2f}% at best validation epoch {best['epoch']} "
        f"(val {100 * best['val_error']:.2f}%), {summary['wall_seconds']:.0f}s; "
        f"model in {run_dir / 'model.safetensors'}")
    return summary


def _config_json(info: dict) -> dict:
    """What config.json holds: the configuration, the environment, the resumes, and a time budget's plan."""
    return {k: info[k] for k in ("config", "environment", "resumes", "plan") if k in info}


def _interrupted(signum: int, where: str, path: Path) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"stopped by {signal.Signals(signum).name} {where}; checkpoint written to {path}; continue with "
        f"`binaryconnect train --resume {path.parent}`", signum)


def _save(path: Path, p: _Progress, info: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
          generators: dict[str, torch.Generator], seconds: float) -> None:
    """Write the checkpoint: tensors (see checkpoint.py for the names) and the JSON state."""
    optimizer_tensors, optimizer_plain = optimizer_to_tensors(optimizer)
    tensors = {**with_prefix("model.", model.state_dict()), **with_prefix("optimizer.", optimizer_tensors),
               **{f"rng.{name}": g.get_state() for name, g in generators.items()},
               "rng.torch": torch.get_rng_state()}
    cuda = _cuda_device(generators)
    if cuda is not None:  # PyTorch's default CUDA generator: compiled stochastic layers draw from it
        tensors["rng.cuda"] = torch.cuda.get_rng_state(cuda)
    if p.step > 0:
        tensors["progress.perm"] = p.perm
        tensors["progress.loss_sum"] = p.loss_sum
    if p.best_model is not None:
        tensors.update(with_prefix("best.", p.best_model))
    state = {**info, "epoch": p.epoch, "step": p.step, "global_step": p.global_step, "lr": p.lr,
             "best": p.best, "best_metadata": p.best_metadata, "history": p.history, "seconds": seconds,
             "optimizer": optimizer_plain, "rng_devices": {name: g.device.type for name, g in generators.items()}}
    save_checkpoint(path, tensors, state)


def _set_generator_state(set_state, value: torch.Tensor, name: str) -> None:
    """``set_state(value)``; a state torch refuses (another size or kind) is a damaged checkpoint. Only this
    call's RuntimeError is translated: out-of-memory or CUDA errors elsewhere keep their own message."""
    try:
        set_state(value)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint's {name} generator state is unusable ({exc})") from None


def _cuda_device(generators: dict[str, torch.Generator]) -> torch.device | None:
    """The CUDA device the run trains on (its device generators live there), or None on the CPU."""
    return next((g.device for g in generators.values() if g.device.type == "cuda"), None)


def _restore(checkpoint: tuple[dict, dict], info: dict, changes: dict, model: nn.Module,
             optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], log) -> tuple[_Progress, dict]:
    """Load a checkpoint's state into ``model``, ``optimizer`` and ``generators``; return the progress and
    the run information (``info`` with the history of resumes, this one included)."""
    tensors, state = checkpoint
    try:
        if state["data_fingerprint"] != info["data_fingerprint"]:
            raise CheckpointError(
                f"the training data differ from those the run was started with (fingerprint "
                f"{state['data_fingerprint']}, now {info['data_fingerprint']}): resume with the same dataset, "
                "preprocessing and training subset"
            )
        try:
            model.load_state_dict(strip_prefix("model.", tensors))
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint's model does not match its configuration ({exc})") from None
        optimizer_from_tensors(optimizer, strip_prefix("optimizer.", tensors), state["optimizer"])
        for name, g in generators.items():
            if state["rng_devices"][name] == g.device.type:
                _set_generator_state(g.set_state, tensors[f"rng.{name}"], name)
            else:  # generator states do not carry over between CPU and CUDA
                g.manual_seed(int(info["config"]["seed"]) * 1_000_003 + state["global_step"] + len(name))
                log(f"note: the {name} generator was saved on {state['rng_devices'][name]} and is reseeded on "
                    f"{g.device.type}: from here on the run is not bit-identical to an uninterrupted one")
        _set_generator_state(torch.set_rng_state, tensors["rng.torch"], "torch")
        cuda = _cuda_device(generators)
        if cuda is not None and "rng.cuda" in tensors:  # absent when saved on the CPU (or before it was saved)
            _set_generator_state(lambda s: torch.cuda.set_rng_state(s, cuda), tensors["rng.cuda"], "cuda")
        best_model = strip_prefix("best.", tensors) or None
        p = _Progress(epoch=state["epoch"], step=state["step"], global_step=state["global_step"], lr=state["lr"],
                      perm=tensors.get("progress.perm"), loss_sum=tensors.get("progress.loss_sum"),
                      best=state["best"], best_model=best_model, best_metadata=state["best_metadata"],
                      history=state["history"], seconds=state["seconds"])
        if p.step > 0 and (p.perm is None or p.loss_sum is None):
            raise KeyError("progress.perm")
        resumed = {"epoch": p.epoch, "step": p.step, "global_step": p.global_step, "changed": changes,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": info["environment"]}
        info = {**info, "environment": state["environment"], "resumes": [*state["resumes"], resumed],
                **({"plan": state["plan"]} if "plan" in state else {})}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint is incomplete or inconsistent ({exc!r})") from None
    return p, info


def load_run(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The best model of a run directory (or a model file) in eval mode, and its configuration."""
    model, config, _ = load_run_with_metadata(path, device)
    return model, config


def load_run_with_metadata(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig, dict[str, str]]:
    """``load_run`` and the model file's metadata (input shape, number of classes, epoch ...), from one read."""
    path = Path(path)
    model_path = path / "model.safetensors" if path.is_dir() else path
    if path.suffix == ".bcnn" and path.is_file():
        raise CheckpointError(f"{path} is a packed model: `binaryconnect predict {path}` runs it (on its test split, "
                              "or on --input); evaluate takes a run directory or its model.safetensors")
    if path.is_dir() and not model_path.is_file():
        raise CheckpointError(f"{path} holds no model.safetensors: is it a finished binaryconnect run directory?")
    state, config_dict, metadata = load_model_file(model_path)
    try:
        config = TrainConfig.from_dict(config_dict).validate()
        input_shape = tuple(json.loads(metadata["input_shape"]))
        num_classes = int(metadata["num_classes"])
    except (ConfigError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{model_path} has an unusable configuration in its metadata ({exc})") from None
    model = build_model(config, input_shape, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{model_path} does not match its configuration: {exc}") from None
    return model.to(resolve_device(device)).eval(), config, metadata
