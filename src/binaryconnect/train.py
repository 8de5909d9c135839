"""The training loop: ``fit(config, run_dir)`` trains, selects the best-validation model, and writes the
run directory. It reads top to bottom: build -> for each epoch (train, evaluate, keep the best) -> summary.

Run directory:
    config.json      the resolved configuration (a run can be repeated from it) and the environment
    metrics.jsonl    one JSON object per epoch: train loss, validation and test error, learning rate, seconds
    model.safetensors  the best-validation model (state_dict; the configuration in its metadata)
    summary.json     best epoch, its validation and test error, wall time
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_write_json, load_model_file, save_model
from .config import TrainConfig
from .data import Splits, load_dataset
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .layers import set_generator, set_stochastic_eval
from .losses import square_hinge_loss
from .models import create_model
from .optim import exponential_lr, make_optimizer, set_lr


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def build_model(config: TrainConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The network ``config`` names, for inputs of ``input_shape``."""
    try:
        return create_model(
            config.model, input_shape=input_shape, num_classes=num_classes, binarization=config.binarization,
            H=config.H, ste=config.ste, stochastic_eval=config.stochastic_eval, **config.model_kwargs,
        )
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
           "platform": platform.platform(), "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def fit(config: TrainConfig, run_dir: str | Path, progress: bool | None = None, log=print,
        data: Splits | None = None) -> dict:
    """Train ``config`` and write the run directory ``run_dir``; return the summary dictionary.

    ``data`` may be passed to reuse already loaded splits (tests); otherwise the dataset is loaded from
    ``config.data_dir``. ``progress`` shows a bar per epoch (default: when stderr is a terminal).
    """
    config.validate()
    run_dir = Path(run_dir)
    device = resolve_device(config.device)
    if progress is None:
        progress = sys.stderr.isatty()
    if config.deterministic:
        torch.use_deterministic_algorithms(True)

    # --- data, on the training device once ---
    if data is None:
        data = load_dataset(config.dataset, config.data_dir, val_size=config.val_size, download=config.download,
                            **config.dataset_kwargs)
    if config.train_subset is not None:
        data = data.subset_train(config.train_subset)
    data = data.to(device)
    n_train = len(data.train_x)
    steps = n_train // config.batch_size
    if steps == 0:
        raise ConfigError(f"batch_size {config.batch_size} is larger than the {n_train} training examples")

    # --- model, optimizer, random generators (all from the seed) ---
    torch.manual_seed(config.seed)
    model = build_model(config, data.input_shape, data.num_classes).to(device)
    optimizer = make_optimizer(model, config.lr_start, config.lr_scale)
    shuffle_gen = torch.Generator().manual_seed(config.seed)
    binarize_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
    augment_gen = torch.Generator(device=device).manual_seed(config.seed + 2)
    set_generator(model, binarize_gen)

    # --- run directory ---
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", {"config": config.to_dict(), "environment": _environment(device)})
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {config.recipe or config.model} ({config.binarization}) on {config.dataset}: "
        f"{n_train} train / {len(data.val_x)} val / {len(data.test_x)} test, {n_params:,} parameters, "
        f"{config.epochs} epochs, device {device}, run dir {run_dir}")

    best = {"epoch": -1, "val_error": math.inf, "test_error": math.nan}
    start = time.perf_counter()
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        lr = exponential_lr(epoch, config.epochs, config.lr_start, config.lr_end)
        set_lr(optimizer, lr)

        # --- train one epoch: shuffled mini-batches sliced on the device (last partial batch dropped) ---
        model.train()
        perm = torch.randperm(n_train, generator=shuffle_gen).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for step in _progress(range(steps), steps, f"epoch {epoch + 1}/{config.epochs}", progress):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            xb = data.train_x[idx]
            if data.train_transform is not None:
                xb = data.train_transform(xb, augment_gen)
            loss = square_hinge_loss(model(xb), data.train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}: training stopped before "
                    f"the optimizer step; the best model so far is in {run_dir}. Lower the learning rate "
                    "(--lr-start) or check the data."
                )
            optimizer.step()  # also clips the latent weights to [-H, H]
            loss_sum += loss.detach()

        # --- evaluate; keep the best-validation model ---
        val_error, _ = evaluate(model, data.val_x, data.val_y, config.eval_batch_size, config.eval_samples)
        test_error, _ = evaluate(model, data.test_x, data.test_y, config.eval_batch_size, config.eval_samples)
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / steps, "val_error": val_error,
                  "test_error": test_error, "seconds": time.perf_counter() - t0}
        if val_error <= best["val_error"]:  # ties go to the later epoch, as in the original code
            best = {"epoch": epoch + 1, "val_error": val_error, "test_error": test_error}
            save_model(run_dir / "model.safetensors", model, config.to_dict(), epoch=str(epoch + 1),
                       input_shape=json.dumps(list(data.input_shape)), num_classes=str(data.num_classes))
        record["best_epoch"] = best["epoch"]
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"epoch {epoch + 1:4d}/{config.epochs}  lr {lr:.2e}  loss {record['train_loss']:.4f}  "
            f"val {100 * val_error:.2f}%  test {100 * test_error:.2f}%  ({record['seconds']:.1f}s)")

    summary = {"recipe": config.recipe, "binarization": config.binarization, "seed": config.seed,
               "epochs": config.epochs, "best_epoch": best["epoch"], "best_val_error": best["val_error"],
               "test_error": best["test_error"], "wall_seconds": time.perf_counter() - start,
               "device": str(device), "run_dir": str(run_dir)}
    atomic_write_json(run_dir / "summary.json", summary)
    log(f"done: test error {100 * best['test_error']:.2f}% at best validation epoch {best['epoch']} "
        f"(val {100 * best['val_error']:.2f}%), {summary['wall_seconds']:.0f}s; model in {run_dir / 'model.safetensors'}")
    return summary


def load_run(path: str | Path, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The best model of a run directory (or a model file) in eval mode, and its configuration."""
    path = Path(path)
    model_path = path / "model.safetensors" if path.is_dir() else path
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
    return model.to(resolve_device(device)).eval(), config
