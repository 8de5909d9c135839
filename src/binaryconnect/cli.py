"""The command line: the only module that parses arguments.

    binaryconnect train mnist-deterministic            # a recipe by name, options override it
    binaryconnect train mnist-stochastic --epochs 50 --seed 1 -o runs/s1
    binaryconnect evaluate runs/s1                     # test error of the best-validation model
    binaryconnect recipes                              # list the recipes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .binarize import BINARIZATIONS, STE_VARIANTS
from .config import RECIPES, list_recipes, recipe_config
from .errors import BinaryConnectError, ConfigError, TrainingInterrupted
from .layers import STOCHASTIC_EVAL
from .optim import LR_SCALES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``binaryconnect train: error: ... (see --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a network with binary weights",
                       description="Train a recipe (see `binaryconnect recipes`); options override it.")
    p.add_argument("recipe", nargs="?", help=f"recipe name: {', '.join(list_recipes())}")
    p.add_argument("-o", "--out", type=Path, help="run directory (default: runs/<recipe>-s<seed>-<time>)")
    p.add_argument("--data-dir", help="dataset root (default: $BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="never try to download a missing dataset")
    p.add_argument("--binarization", choices=BINARIZATIONS)
    p.add_argument("--H", dest="H", type=_positive_float, help="binary weight value +-H (paper: 1)")
    p.add_argument("--ste", choices=STE_VARIANTS, help="straight-through estimator (paper: identity)")
    p.add_argument("--stochastic-eval", choices=STOCHASTIC_EVAL,
                   help="stochastic models at test time: real weights (paper) or sampled binary weights")
    p.add_argument("--eval-samples", type=_positive_int, help="with --stochastic-eval sample: average N samples")
    p.add_argument("--lr-scale", choices=LR_SCALES, help="per-layer learning-rate scale (paper: glorot)")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr-start", type=_positive_float)
    p.add_argument("--lr-end", type=_positive_float)
    p.add_argument("--hidden", type=_positive_int, help="MLP: units per hidden layer (paper: 1024)")
    p.add_argument("--depth", type=_non_negative_int, help="MLP: number of hidden layers (paper: 3)")
    p.add_argument("--val-size", type=_positive_int, help="training examples held out for validation")
    p.add_argument("--train-subset", type=_positive_int, help="train on the first N training examples only")
    p.add_argument("--seed", type=_non_negative_int)
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="use deterministic algorithms (bit-reproducible on CPU)")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="also checkpoint every N steps (always after every epoch and on Ctrl-C/SIGTERM)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its checkpoint; only --epochs, --device, --checkpoint-every, "
                        "--data-dir, --no-download, --deterministic and the speed options may differ from the "
                        "run's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final summary line")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> int:
    from .train import fit, resume

    log = (lambda *a, **k: None) if args.quiet else print
    progress = False if args.no_progress else None
    model_kwargs = {k: v for k, v in (("hidden", args.hidden), ("depth", args.depth)) if v is not None}
    overrides = {name: getattr(args, name) for name in _TRAIN_OPTIONS}
    if args.resume is not None:  # the options given must agree with the run's, or be allowed to change
        if args.out is not None:
            raise ConfigError("--resume continues RUN_DIR in place: drop --out")
        summary = resume(args.resume, progress=progress, log=log, recipe=args.recipe, model_kwargs=model_kwargs,
                         **overrides)
    else:
        if args.recipe is None:
            raise ConfigError(f"name a recipe, e.g. `binaryconnect train mnist-deterministic`; "
                              f"known recipes: {', '.join(list_recipes())}")
        config = recipe_config(args.recipe, model_kwargs=model_kwargs, **overrides)
        run_dir = args.out or Path("runs") / f"{args.recipe}-s{config.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ConfigError(f"run directory {run_dir} already exists and is not empty; choose another --out, "
                              f"or continue that run with `binaryconnect train --resume {run_dir}`")
        summary = fit(config, run_dir, progress=progress, log=log)
    if args.quiet:
        print(json.dumps(summary))
    return 0


#: ``train`` options that map one to one onto TrainConfig fields.
_TRAIN_OPTIONS = ("data_dir", "download", "binarization", "H", "ste", "stochastic_eval", "eval_samples", "lr_scale",
                  "epochs", "batch_size", "lr_start", "lr_end", "val_size", "train_subset", "seed", "device",
                  "deterministic", "checkpoint_every")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="test error of a trained run's best model",
                       description="Evaluate the best-validation model of a run directory (or a model file).")
    p.add_argument("run", type=Path, help="run directory or model.safetensors")
    p.add_argument("--data-dir", help="dataset root (default: the run's, else $BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--split", choices=("test", "val", "both"), default="test")
    p.add_argument("--stochastic-eval", choices=STOCHASTIC_EVAL,
                   help="stochastic models: real weights (paper) or sampled binary weights")
    p.add_argument("--samples", type=_positive_int, default=1, help="average the outputs of N weight samples")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weight samples")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import torch

    from .data import load_dataset
    from .layers import set_generator, set_stochastic_eval
    from .train import evaluate, load_run, resolve_device

    device = resolve_device(args.device)
    model, config = load_run(args.run, device=str(device))
    if args.stochastic_eval:
        set_stochastic_eval(model, args.stochastic_eval)
    set_generator(model, torch.Generator(device=device).manual_seed(args.seed))
    data = load_dataset(config.dataset, args.data_dir or config.data_dir, val_size=config.val_size,
                        download=False).to(device)
    result = {"run": str(args.run), "binarization": config.binarization}
    if config.binarization == "stochastic":
        result["stochastic_eval"] = args.stochastic_eval or config.stochastic_eval
        result["samples"] = args.samples
    splits = {"test": (data.test_x, data.test_y), "val": (data.val_x, data.val_y)}
    for name in (("val", "test") if args.split == "both" else (args.split,)):
        err, loss = evaluate(model, *splits[name], args.batch_size, args.samples)
        result[f"{name}_error"] = err
        result[f"{name}_loss"] = loss
    if args.json:
        print(json.dumps(result))
    else:
        print("  ".join(f"{k} {100 * v:.2f}%" if k.endswith("_error") else f"{k} {v}" for k, v in result.items()
                        if not k.endswith("_loss")))
    return 0


def _add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the training recipes")
    p.set_defaults(handler=_cmd_recipes)


def _cmd_recipes(args) -> int:
    for name in list_recipes():
        r = RECIPES[name]
        print(f"{name:24s} {r['dataset']:8s} {r['model']:6s} {r['binarization']:14s} epochs {r['epochs']:4d}  "
              f"batch {r['batch_size']:4d}  lr {r['lr_start']:g} -> {r['lr_end']:g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="binaryconnect", description=__doc__.split("\n\n")[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"binaryconnect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_train, _add_evaluate, _add_recipes):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TrainingInterrupted as exc:  # a clean stop, not an error: exit code 130 (SIGINT) or 143 (SIGTERM)
        print(f"binaryconnect: {exc}", file=sys.stderr)
        return exc.exit_code
    except BinaryConnectError as exc:
        print(f"binaryconnect: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("binaryconnect: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
