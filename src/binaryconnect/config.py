"""Typed, validated training configuration, and the paper's recipes by name.

A ``TrainConfig`` is what a run directory's ``config.json`` holds: a run can be repeated from it.
Recipes are named partial configurations (``mnist-deterministic`` ...): options given on the command
line override them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ._values import is_finite_number, is_int
from .binarize import BINARIZATIONS, STE_VARIANTS
from .errors import ConfigError
from .layers import STOCHASTIC_EVAL
from .optim import LR_SCALES
from .speed import AMP_MODES, COMPILE_MODES, CUDA_GRAPH_MODES

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Field comments give the paper's MNIST values."""

    dataset: str = "mnist"
    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)  # e.g. {"hidden": 1024, "depth": 3}
    dataset_kwargs: dict = field(default_factory=dict)  # options of the dataset loader (preprocessing ...)
    binarization: str = "deterministic"  # deterministic | stochastic | none
    H: float = 1.0
    ste: str = "identity"  # identity (paper) | clipped (zero gradient where |W| > H)
    stochastic_eval: str = "real"  # real (paper) | sample
    eval_samples: int = 1  # with stochastic_eval="sample": average the outputs of N weight samples
    lr_scale: str = "glorot"  # glorot (paper) | none
    epochs: int = 250
    batch_size: int = 100
    lr_start: float = 1e-3
    lr_end: float = 3e-6
    val_size: int = 10_000
    train_subset: int | None = None  # train on the first N training examples only (smoke tests)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms
    compile: bool = False  # torch.compile the training forward and backward pass (speed.py)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | ...
    amp: str = "none"  # none | bf16: autocast of the training forward pass (speed.py)
    channels_last: bool = False  # NHWC memory format for the convolutions (speed.py)
    cuda_graph: bool = False  # record the whole training step as CUDA graphs (cudagraph.py; CUDA only)
    eval_batch_size: int = 1000
    recipe: str | None = None
    data_dir: str | None = None
    download: bool = True
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps
    checkpoint_seconds: float = 30.0  # at epoch ends, checkpoint only if this long since the last (0: always)
    time_budget: float | None = None  # seconds of training: after the first epoch, plan the epochs (at most
    # `epochs`) that fit in it; `epochs` then becomes the planned number (train.py, plan_epochs)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first invalid option and what is allowed; return self."""
        _choice("binarization", self.binarization, BINARIZATIONS)
        _choice("ste", self.ste, STE_VARIANTS)
        _choice("stochastic_eval", self.stochastic_eval, STOCHASTIC_EVAL)
        _choice("lr_scale", self.lr_scale, LR_SCALES)
        _choice("amp", self.amp, AMP_MODES)
        _choice("compile_mode", self.compile_mode, COMPILE_MODES)
        for name in ("compile", "channels_last", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode {self.compile_mode!r} needs compile=true (--compile)")
        if self.cuda_graph and self.compile and self.compile_mode in CUDA_GRAPH_MODES:
            raise ConfigError(f"cuda_graph (--cuda-graph) records the whole step as CUDA graphs itself; compile_mode "
                              f"{self.compile_mode!r} records its own inside it, which cannot be nested: drop one "
                              "(--compile-mode default or max-autotune-no-cudagraphs go with --cuda-graph)")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2: batch norm in training needs more than one example "
                              "per batch")
        _positive_int("eval_batch_size", self.eval_batch_size)
        _positive_int("eval_samples", self.eval_samples)
        _positive_int("val_size", self.val_size)
        if self.train_subset is not None:
            _positive_int("train_subset", self.train_subset)
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
        if not (is_finite_number(self.checkpoint_seconds) and self.checkpoint_seconds >= 0):
            raise ConfigError(f"checkpoint_seconds must be a non-negative number, got {self.checkpoint_seconds!r}")
        if self.time_budget is not None and not (is_finite_number(self.time_budget) and self.time_budget > 0):
            raise ConfigError(f"time_budget must be a positive number of seconds, got {self.time_budget!r}")
        for name in ("H", "lr_start", "lr_end"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not 1.1754943508222875e-38 <= self.H <= 3.4028234663852886e38:  # the weights are float32
            raise ConfigError(f"H must lie in float32's normal range (1.18e-38 to 3.40e38), got {self.H!r}")
        if self.lr_end > self.lr_start:
            raise ConfigError(f"lr_end ({self.lr_end}) must not exceed lr_start ({self.lr_start})")
        for option, flag in (("val_size", "--val-size"), ("download", "--no-download"), ("root", "--data-dir")):
            if isinstance(self.dataset_kwargs, dict) and option in self.dataset_kwargs:
                raise ConfigError(f"{option} is not a dataset option here but a training option: use {flag}")
        for name in ("model_kwargs", "dataset_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a mapping, got {getattr(self, name)!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer from 0 to {2**32 - 1}, got {self.seed!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
        return cls(**data)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


_MNIST = dict(dataset="mnist", model="mlp", model_kwargs={"hidden": 1024, "depth": 3, "bn_momentum": 0.15},
              epochs=250, batch_size=100, lr_start=1e-3, lr_end=3e-6, val_size=10_000)

#: The paper's recipes. Epochs, batch size and learning rates are those of the original code.
RECIPES: dict[str, dict] = {
    "mnist-float": {**_MNIST, "binarization": "none"},
    "mnist-deterministic": {**_MNIST, "binarization": "deterministic"},
    "mnist-stochastic": {**_MNIST, "binarization": "stochastic"},
}

# CIFAR-10 and SVHN (sections 3.3, 3.4): the original code's cifar10.py / svhn.py (batch 50, BN momentum 0.1,
# Adam with the learning rate decaying exponentially per epoch). The paper fitted ZCA on the 50,000 training
# images; here it is fitted on the 45,000 of the training split.
_CIFAR10 = dict(dataset="cifar10", model="convnet",
                model_kwargs={"channels": [128, 256, 512], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
                dataset_kwargs={"preprocess": "gcn-zca"}, epochs=500, batch_size=50, lr_start=3e-3, lr_end=2e-6,
                val_size=5_000)
_SVHN = dict(dataset="svhn", model="convnet",
             model_kwargs={"channels": [64, 128, 256], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
             dataset_kwargs={"preprocess": "gcn-lcn", "extra": True}, epochs=200, batch_size=50, lr_start=1e-2,
             lr_end=3e-6, val_size=6_000)
for _b in ("float", "deterministic", "stochastic"):
    _binarization = "none" if _b == "float" else _b
    RECIPES[f"cifar10-{_b}"] = {**_CIFAR10, "binarization": _binarization}
    # GCN without ZCA: ZCA fitted on the JPEG-degraded copy amplifies the frequencies JPEG removed
    RECIPES[f"cifar10-gcn-{_b}"] = {**_CIFAR10, "binarization": _binarization,
                                    "dataset_kwargs": {"preprocess": "gcn"}}
    # beyond the paper: random crops (4-pixel zero padding) and horizontal flips, on GCN inputs
    RECIPES[f"cifar10-augmented-{_b}"] = {**_CIFAR10, "binarization": _binarization,
                                          "dataset_kwargs": {"preprocess": "gcn", "augment": "crop-flip"}}
    RECIPES[f"svhn-{_b}"] = {**_SVHN, "binarization": _binarization}


def list_recipes() -> list[str]:
    return sorted(RECIPES)


def recipe_config(name: str | None, **overrides) -> TrainConfig:
    """The recipe ``name`` (or the defaults when None) with ``overrides`` applied, validated. ``model_kwargs``
    and ``dataset_kwargs`` given are merged into the recipe's, except that another ``model`` than the recipe's
    starts from no model options (the recipe's are its own model's: the MLP's depth means nothing to another
    network) and leaves ``recipe`` unset (the run is then named by its model and binarization); another
    ``dataset`` keeps those of the recipe's dataset options that it has (preprocessing, augmentation) and
    drops the others (SVHN's ``extra`` means nothing to an ImageFolder tree). (The run keeps the recipe's
    name: runs started so are resumed and repeated by sweeps with the recipe they name.)"""
    base: dict = {}
    if name is not None:
        try:
            base = {**RECIPES[name], "recipe": name}
        except KeyError:
            raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}") from None
    if overrides.get("model") is not None and overrides["model"] != base.get("model"):
        base.pop("model_kwargs", None)
        base.pop("recipe", None)  # nor is it that recipe's run: logs and reports name it by its model
    if overrides.get("dataset") is not None and base and overrides["dataset"] != base.get("dataset"):
        from .data import dataset_options  # (data imports torch: not at module level)

        keep = dataset_options(overrides["dataset"])  # the recipe's preprocessing, augmentation... where they apply
        base["dataset_kwargs"] = {k: v for k, v in base.get("dataset_kwargs", {}).items() if k in keep}
    merged = {key: {**base.pop(key, {}), **(overrides.pop(key, None) or {})}
              for key in ("model_kwargs", "dataset_kwargs")}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict({**base, **merged}).validate()


#: Options that may differ when a run is resumed (``binaryconnect train --resume``): they change how
#: long it trains, where and how fast, and how often it checkpoints, not what it trains. Changing
#: ``epochs`` changes the learning-rate schedule of the epochs still to come (it decays to ``lr_end`` at
#: the new last epoch); changing the device or the speed options gives a valid continuation that is not
#: bit-identical to an uninterrupted run.
RESUME_MAY_CHANGE = ("epochs", "device", "checkpoint_every", "checkpoint_seconds", "eval_batch_size", "data_dir",
                     "download", "deterministic", "compile", "compile_mode", "amp", "channels_last", "cuda_graph")


def keeps_plan(plan, saved_budget, budget, epochs) -> bool:
    """Whether a run with a time budget that planned its epochs (``plan``, as config.json and checkpoints
    hold it; ``saved_budget``, its budget) keeps that plan when asked again for ``budget`` and ``epochs``:
    the same budget and the ``--epochs`` cap the plan was made under, as a repeated sweep asks. Any other
    ``epochs`` is a new number of epochs to train, as for any run (``train --resume``, ``sweep``)."""
    return isinstance(plan, dict) and budget == saved_budget and epochs == plan.get("cap")


def resume_config(saved: TrainConfig, **overrides) -> tuple[TrainConfig, dict[str, list]]:
    """``saved`` with ``overrides`` (as for ``recipe_config``; None means unchanged) applied, validated,
    and the changes as ``{name: [old, new]}``. Raise ConfigError naming every option that differs from
    the saved run but is not in ``RESUME_MAY_CHANGE`` (architecture, binarization, dataset, seed ...)."""
    old = saved.to_dict()
    new = dict(old)
    for key in ("model_kwargs", "dataset_kwargs"):
        new[key] = {**old[key], **(overrides.pop(key, None) or {})}
    new.update({k: v for k, v in overrides.items() if v is not None})
    config = TrainConfig.from_dict(new).validate()
    changes = {k: [old[k], v] for k, v in config.to_dict().items() if v != old[k]}
    refused = [f"{k} (run: {a!r}, asked: {b!r})" for k, (a, b) in changes.items() if k not in RESUME_MAY_CHANGE]
    if refused:
        raise ConfigError(
            f"the run was started with a different {'; '.join(refused)}; only {', '.join(RESUME_MAY_CHANGE)} "
            "may change when resuming: drop those options or start a new run"
        )
    return config, changes
