"""The command line: the only module that parses arguments.

    binaryconnect train mnist-deterministic            # a recipe by name, options override it
    binaryconnect train mnist-stochastic --epochs 50 --seed 1 -o runs/s1
    binaryconnect evaluate runs/s1                     # test error of the best-validation model
    binaryconnect recipes                              # list the recipes
    binaryconnect export runs/s1 -o s1.bcnn            # pack to 1 bit per weight, batch norm folded
    binaryconnect predict s1.bcnn                      # packed inference (test error, or --input x.npy)
    binaryconnect summary s1.bcnn                      # per-layer parameters, bytes on disk, additions
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from . import rundir
from .binarize import BINARIZATIONS, STE_VARIANTS
from .config import RECIPES, list_recipes, recipe_config
from .errors import BinaryConnectError, ConfigError, DataError, TrainingInterrupted
from .layers import STOCHASTIC_EVAL
from .optim import LR_SCALES
from .speed import AMP_MODES, COMPILE_MODES


def _number(parse, valid, what: str):
    """An argparse ``type``: ``parse`` the text, accept it when ``valid(value)``, else say ``what`` was expected."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a non-negative number")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

#: ``export``'s default ``--recalibrate`` for a run with stochastic layers: 100 batches (10,000 MNIST training
#: images at the recipe's batch of 100; 1,000 recover most of the accuracy, RESULTS.md).
RECALIBRATE_BATCHES = 100


def _parse_duration(text: str) -> float:
    """Seconds from ``540``, ``540s``, ``9m`` or ``1.5h``, to the microsecond (``4.1m`` is 246 s, not
    245.99999999999997: the same budget given again must compare equal)."""
    text = text.strip()
    number, unit = (text[:-1], text[-1]) if text[-1:].lower() in _UNITS else (text, "s")
    return round(float(number) * _UNITS[unit.lower()], 6)


_duration = _number(_parse_duration, lambda v: 0 < v < float("inf"), "a positive duration (540, 540s, 9m, 1.5h)")


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
    p.add_argument("--epochs", type=_positive_int, help="epochs to train (with --time-budget: at most this many)")
    p.add_argument("--time-budget", type=_duration, metavar="SECONDS",
                   help="train for about SECONDS (or 9m, 1.5h): after the first epoch, as many epochs as fit "
                        "(at most --epochs) are planned, and the learning rate decays from --lr-start to --lr-end "
                        "over them")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr-start", type=_positive_float)
    p.add_argument("--lr-end", type=_positive_float)
    p.add_argument("--hidden", type=_positive_int, help="units per hidden dense layer: the MLP's, the convnet's "
                                                        "fully connected layers (paper: 1024)")
    p.add_argument("--depth", type=_non_negative_int, help="MLP: number of hidden layers (paper: 3); the convnet "
                                                           "has no such option")
    p.add_argument("--val-size", type=_positive_int, help="training examples held out for validation")
    p.add_argument("--train-subset", type=_positive_int, help="train on the first N training examples only")
    p.add_argument("--dataset", help="dataset instead of the recipe's (mnist, cifar10, svhn, imagefolder)")
    p.add_argument("--preprocess", help="image preprocessing: none, gcn, gcn-zca (CIFAR-10), gcn-lcn (SVHN), "
                                        "gcn-lcn-pylearn2 (LCN's norm from the uncentred image, as pylearn2); "
                                        "MNIST: symmetric ([-1, 1], default), center ([0, 1] minus the pixel means)")
    p.add_argument("--augment", help="training-batch augmentation: none (paper), crop, crop-flip")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="any option of the dataset loader, e.g. source=jpeg, extra=false, path=DIR (repeatable)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training step (--no-compile: not, e.g. when resuming a compiled run)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile); reduce-overhead: CUDA graphs on a GPU")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast the training forward pass (bf16) or not (none)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for convolutions")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="record the whole training step (forward, loss, backward, Adam, clipping) as CUDA "
                        "graphs: one launch per step instead of one per kernel (CUDA only)")
    p.add_argument("--seed", type=_non_negative_int)
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="use deterministic algorithms (bit-reproducible on CPU)")
    p.add_argument("--checkpoint-every", type=_positive_int, metavar="N",
                   help="also checkpoint every N steps (besides epoch ends, see --checkpoint-seconds, and stops)")
    p.add_argument("--checkpoint-seconds", type=_non_negative_float, metavar="S",
                   help="at an epoch's end, checkpoint (and write the best model) only if S seconds passed "
                        "since the last checkpoint (default 30; 0: after every epoch; the last epoch, Ctrl-C/SIGTERM "
                        "and an epoch end that is a multiple of --checkpoint-every always checkpoint): a GPU "
                        "epoch can be shorter than the write")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR from its checkpoint; only --epochs, --device, --checkpoint-every, "
                        "--checkpoint-seconds, "
                        "--data-dir, --no-download, --deterministic and the speed options may differ from the "
                        "run's (a run whose time budget planned its epochs keeps them when given its --time-budget "
                        "and --epochs again; another --epochs is the new number of epochs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final summary line")
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args) -> int:
    from .train import fit, resume

    log = (lambda *a, **k: None) if args.quiet else print
    progress = False if args.no_progress else None
    model_kwargs, overrides = _train_overrides(args)
    if args.resume is not None:  # the options given must agree with the run's, or be allowed to change
        if args.out is not None:
            raise ConfigError("--resume continues RUN_DIR in place: drop --out")
        held = rundir.hold(args.resume) if args.resume.is_dir() else None  # one writer at a time
        try:
            summary = resume(args.resume, progress=progress, log=log, recipe=args.recipe, model_kwargs=model_kwargs,
                             **overrides)
        finally:
            if held is not None:
                held.release()
    else:
        config = _new_run_config(args)
        named = args.out is None  # the default name: runs/<recipe>-s<seed>-<time>, numbered if taken
        handles = threading.current_thread() is threading.main_thread()  # signal handlers: the main thread's
        stops = {signal.SIGINT, signal.SIGTERM}
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops) if handles else None  # a claim: made whole or not
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if handles else None  # (training sets its own)
        try:
            claim = rundir.claim_new(args.out or Path("runs") / f"{args.recipe}-s{config.seed}-"
                                     f"{time.strftime('%Y%m%d-%H%M%S')}", numbered=named)
            try:
                if handles:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a signal that came meanwhile: raised here
                summary = fit(config, claim.run_dir, progress=progress, log=log)
            except _Terminated:  # before or after training handled signals itself
                if (claim.run_dir / "summary.json").is_file():
                    raise _Terminated(f"terminated (SIGTERM) as the run ended; it finished: {claim.run_dir}") from None
                if (claim.run_dir / "checkpoint.safetensors").is_file():
                    raise _Terminated(f"stopped (SIGTERM) as training started, with a checkpoint: continue with "
                                      f"`binaryconnect train --resume {claim.run_dir}`") from None
                raise
            finally:  # nothing written (bad data, a typo, SIGTERM while loading): nothing left behind
                if handles:
                    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # the release, whole
                claim.release()
        finally:
            if handles:
                signal.signal(signal.SIGTERM, previous)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    if args.quiet:
        print(json.dumps(summary))
    return 0


class _Terminated(Exception):
    """SIGTERM while a new run starts, before training handles it: the run directory is released, exit 143."""

    def __init__(self, message: str = "terminated (SIGTERM) before training started; nothing was written"):
        super().__init__(message)


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise _Terminated()


def _train_overrides(args) -> tuple[dict, dict]:
    """The ``train`` options given on the command line: model options and TrainConfig overrides."""
    model_kwargs = {k: v for k, v in (("hidden", args.hidden), ("depth", args.depth)) if v is not None}
    overrides = {name: getattr(args, name) for name in _TRAIN_OPTIONS}
    overrides.update(_data_and_speed_options(args))
    return model_kwargs, overrides


def _new_run_config(args):
    """The validated configuration of a new ``train`` run (recipe and options)."""
    if args.recipe is None:
        raise ConfigError(f"name a recipe, e.g. `binaryconnect train mnist-deterministic`; "
                          f"known recipes: {', '.join(list_recipes())}")
    model_kwargs, overrides = _train_overrides(args)
    return recipe_config(args.recipe, model_kwargs=model_kwargs, **overrides)


#: ``train`` options that map one to one onto TrainConfig fields.
_TRAIN_OPTIONS = ("data_dir", "download", "binarization", "H", "ste", "stochastic_eval", "eval_samples", "lr_scale",
                  "epochs", "batch_size", "lr_start", "lr_end", "val_size", "train_subset", "seed", "device",
                  "deterministic", "checkpoint_every", "checkpoint_seconds", "time_budget")


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as JSON when it parses (``false``, ``5000``), else as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _data_and_speed_options(args) -> dict:
    """Configuration overrides from --dataset, --preprocess, --augment, --dataset-option and the speed options."""
    dataset_kwargs = dict(args.dataset_option)
    for name in ("preprocess", "augment"):
        if getattr(args, name) is not None:
            dataset_kwargs[name] = getattr(args, name)
    compile_ = True if args.compile_mode is not None and args.compile is None else args.compile
    return {"dataset": args.dataset, "dataset_kwargs": dataset_kwargs, "compile": compile_,
            "compile_mode": args.compile_mode, "amp": args.amp, "channels_last": args.channels_last,
            "cuda_graph": args.cuda_graph}


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="test error of a trained run's best model",
                       description="Evaluate the best-validation model of a run directory (or a model file).")
    p.add_argument("run", type=Path, help="run directory or model.safetensors")
    p.add_argument("--data-dir", help="dataset root (default: the run's where that folder exists, else "
                                      "$BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--split", choices=("test", "val", "both"), default="test")
    p.add_argument("--stochastic-eval", choices=STOCHASTIC_EVAL,
                   help="stochastic models: real weights (paper) or sampled binary weights")
    p.add_argument("--samples", type=_positive_int,
                   help="with --stochastic-eval sample: average the outputs of N weight samples (default: the "
                        "run's --eval-samples)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the weight samples")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_evaluate)


def _cmd_evaluate(args) -> int:
    import torch

    from .layers import set_generator, set_stochastic_eval
    from .train import evaluate, load_run_with_metadata, resolve_device, run_dataset

    device = resolve_device(args.device)
    model, config, meta = load_run_with_metadata(args.run, device=str(device))
    mode = args.stochastic_eval or config.stochastic_eval
    given = args.samples
    args.samples = given or (config.eval_samples if mode == "sample" else 1)  # the run's own, as in training
    if config.binarization != "stochastic" and (args.stochastic_eval or (given or 1) > 1):
        weights = "its binary weights" if config.binarization == "deterministic" else "its float weights"
        raise ConfigError(f"--stochastic-eval and --samples apply to stochastic runs; {args.run} is "
                          f"{config.binarization} and is evaluated with {weights}")
    if mode != "sample" and (given or 1) > 1:
        raise ConfigError(f"--samples {args.samples} averages sampled binary weights: add --stochastic-eval sample "
                          "(the real-valued weights give one output)")
    if args.stochastic_eval:
        set_stochastic_eval(model, args.stochastic_eval)
    data = run_dataset(config, meta, args.data_dir, "the error").to(device)
    result = {"run": str(args.run), "binarization": config.binarization}
    if config.binarization == "stochastic":
        result["stochastic_eval"] = mode
        if mode == "sample":
            result["samples"] = args.samples
    splits = {"test": (data.test_x, data.test_y), "val": (data.val_x, data.val_y)}
    for name in (("val", "test") if args.split == "both" else (args.split,)):
        # each split's samples from --seed: a split's error does not depend on --split asking for the other
        set_generator(model, torch.Generator(device=device).manual_seed(args.seed))
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
    width = max(map(len, list_recipes()))
    for name in list_recipes():
        r = RECIPES[name]
        print(f"{name:{width}s} {r['dataset']:8s} {r['model']:6s} {r['binarization']:14s} epochs {r['epochs']:4d}  "
              f"batch {r['batch_size']:4d}  lr {r['lr_start']:g} -> {r['lr_end']:g}")
    return 0


def _add_export(sub) -> None:
    from .export.engine import ENGINES

    p = sub.add_parser("export", help="pack a trained run to 1 bit per binary weight (.bcnn)",
                       description="Write a run's best model with every binary weight packed to 1 bit and batch "
                                   "norm folded into a per-channel scale and offset (safetensors, no pickle).")
    p.add_argument("run", type=Path, help="run directory or model.safetensors")
    p.add_argument("-o", "--out", type=Path, help="packed file (default: <run>/model.bcnn)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--evaluate", action="store_true",
                   help="also report the test error of the training model and of the packed model")
    p.add_argument("--recalibrate", type=_non_negative_int, metavar="BATCHES",
                   help="first recompute the batch-norm statistics for the exported weights H * sign(W) on this "
                        f"many batches (the run's batch size) of its training split; default: {RECALIBRATE_BATCHES} "
                        "for a run with stochastic layers (its statistics fit its sampled weights, not H * sign(W); "
                        "it reads the training data), 0 (none) otherwise")
    p.add_argument("--data-dir", help="dataset root for --evaluate and the recalibration (default: the run's where "
                                      "that folder exists, else $BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--engine", choices=ENGINES, help="engine for --evaluate (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args) -> int:
    from .export import PackedModel, summarize
    from .export.convert import _deterministic_twin, export_loaded_run, recalibrate_batch_norm
    from .export.tools import evaluate_packed, model_predictions
    from .layers import binary_layers
    from .train import load_run_with_metadata, run_dataset

    out = args.out or (args.run / "model.bcnn" if args.run.is_dir() else args.run.with_suffix(".bcnn"))
    if out.suffix != ".bcnn":  # also keeps it off the run's own files (.json, .jsonl, .safetensors)
        raise ConfigError(f"-o {out} must end in .bcnn (the packed format), e.g. {out.with_suffix('.bcnn')}")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} already exists; pass --force to overwrite it or choose another -o")
    model, config, meta = load_run_with_metadata(args.run)  # read once, for the export and for --evaluate
    stochastic = any(m.binarization == "stochastic" for m in binary_layers(model))
    batches = args.recalibrate if args.recalibrate is not None else RECALIBRATE_BATCHES if stochastic else 0
    data = None  # the run's dataset, for the recalibration and --evaluate: read before writing (a bad --data-dir)
    if batches or args.evaluate:  # the data root: --data-dir, the run's where it exists, the default
        try:
            data = run_dataset(config, meta, args.data_dir, "the recalibration" if batches else "the test error")
        except DataError as exc:
            if args.recalibrate is not None or not batches or args.evaluate:  # (--evaluate needs the data too)
                raise
            raise DataError(f"{str(exc).rstrip('.')}. (A stochastic run's export recomputes its batch-norm "
                            "statistics for H * sign(W) on its training data by default: give --data-dir, or "
                            "--recalibrate 0 to pack the statistics as trained, "
                            "which fit its sampled weights)") from None
    packed_model, recalibrated = model, None
    if batches:
        packed_model, used = recalibrate_batch_norm(model, data.train_x, batches, config.batch_size)
        binary = any(m.is_binary for m in binary_layers(model))
        recalibrated = {"examples": used, "batch_size": config.batch_size, "split": "train", "seed": 0,
                        "weights": "H * sign(W) in binary layers" if binary else "W (no binary layer)"}
    net = export_loaded_run(args.run, packed_model, config, meta, recalibrated)
    size = net.save(out)  # leaves no file behind that a repeat would need --force for
    total = summarize(net)["total"]
    result = {"out": str(out), "bytes": size, "float32_bytes": total.float32_bytes,
              "compression": total.float32_bytes / size, "binary_params": total.binary_params,
              "params": total.params}
    if args.evaluate:
        reference = model_predictions(model, data.test_x)
        packed = PackedModel(net, engine=args.engine)
        result["packed_test_error"], predictions = evaluate_packed(packed, data.test_x, data.test_y)
        result["model_test_error"] = int((reference != data.test_y).sum()) / len(reference)
        result["agreement"] = int((reference == predictions).sum()) / len(reference)
        result["engine"] = packed.engine
        if recalibrated:  # the model packed: H * sign(W) and the recomputed statistics
            recal = model_predictions(_deterministic_twin(packed_model), data.test_x)
            result["recalibrated_model_test_error"] = int((recal != data.test_y).sum()) / len(recal)
            result["recalibrated_agreement"] = int((recal == predictions).sum()) / len(recal)
    if recalibrated:
        result["recalibrated_examples"] = recalibrated["examples"]
    if args.json:
        print(json.dumps(result))
        _warn_unfit_statistics(net, out, recalibrated)
        return 0
    c = result["compression"]  # float layers are stored as float32: such a file is a little larger
    ratio = f"{c:.1f}x smaller than" if c >= 1 else f"{1 / c:.4f}x the size of"
    print(f"wrote {out}: {size:,} bytes, {ratio} the float32 parameters "
          f"({total.float32_bytes:,} bytes); {total.binary_params:,} of {total.params:,} parameters binary")
    if net.source.get("stochastic_weights"):
        print(f"note: stochastic layers exported as {net.source['stochastic_weights']}")
    if recalibrated:
        print(f"batch-norm statistics recomputed for the exported weights on {recalibrated['examples']:,} training "
              f"examples" + ("" if args.recalibrate is not None else
                             f" ({RECALIBRATE_BATCHES} batches, the default for a stochastic run; --recalibrate 0 "
                             "skips it)"))
    if args.evaluate:
        print(f"test error: training model (eval mode) {100 * result['model_test_error']:.2f}%, packed model "
              f"{100 * result['packed_test_error']:.2f}% ({result['engine']} engine); same prediction on "
              f"{100 * result['agreement']:.2f}% of the test set")
        if recalibrated:
            print(f"the model packed ({recalibrated['weights']}, recomputed statistics) in PyTorch: test error "
                  f"{100 * result['recalibrated_model_test_error']:.2f}%, same prediction as the packed model on "
                  f"{100 * result['recalibrated_agreement']:.2f}%")
    _warn_unfit_statistics(net, out, recalibrated)
    return 0


def _warn_unfit_statistics(net, out: Path, recalibrated) -> None:
    """A stochastic model packed with --recalibrate 0: its batch norms' statistics fit the sampled weights."""
    if net.source.get("stochastic_weights") and not recalibrated:
        sys.stdout.flush()  # after the lines above on a terminal
        warnings.warn(f"{out} holds H * sign(W) with the batch-norm statistics of the stochastic training, which fit "
                      "its sampled weights, not these: such a file can err far more often than the model (MNIST, "
                      f"RESULTS.md: 17.04% against 1.26%). Export it again without --recalibrate 0 (it then reads "
                      f"the training data, {RECALIBRATE_BATCHES} batches) to recompute them for H * sign(W)",
                      stacklevel=1)


def _add_predict(sub) -> None:
    from .export.engine import ENGINES

    p = sub.add_parser("predict", help="run a packed model (.bcnn) on a dataset split or on an array",
                       description="Classify with a packed model: the test split of the dataset it was trained "
                                   "on (prints the error rate), or the examples of --input.")
    p.add_argument("model", type=Path, help="packed model file (.bcnn)")
    p.add_argument("--input", type=Path, help="examples [N, *input_shape] as .npy (no pickle) or .safetensors")
    p.add_argument("--output", type=Path, help="write the logits [N, classes] to this .npy file")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--data-dir", help="dataset root (default: the training run's where that folder exists, "
                                      "else $BINARYCONNECT_DATA, else ./data)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--engine", choices=ENGINES, help="native kernels, pure PyTorch, or auto (default)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_predict)


def _cmd_predict(args) -> int:
    import io

    import numpy as np
    import torch

    from .checkpoint import atomic_write_bytes
    from .export import load_packed
    from .export.tools import dataset_of, read_inputs

    if args.output is not None:  # checked before any work: nothing is lost to a typo
        if args.output.suffix != ".npy":
            raise ConfigError(f"--output {args.output} must end in .npy (the logits are written as a NumPy array)")
        if args.output.exists() and not args.force:
            raise ConfigError(f"{args.output} already exists; pass --force to overwrite it or choose another --output")
        if args.input is not None and args.output.resolve() == args.input.resolve():
            raise ConfigError(f"--output {args.output} is the --input file: choose another --output")
    if args.model.is_dir():
        raise ConfigError(f"{args.model} is a directory: predict takes a packed .bcnn file; make one from a run "
                          f"directory with `binaryconnect export {args.model}`")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_packed(args.model, engine=args.engine)
    if args.input is not None:
        x, y = read_inputs(args.input), None
    else:
        data = dataset_of(model.net, args.data_dir)
        x, y = (data.test_x, data.test_y) if args.split == "test" else (data.val_x, data.val_y)
    start = time.perf_counter()
    logits = torch.cat([model(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)])
    seconds = time.perf_counter() - start
    predictions = logits.argmax(1)
    if args.output is not None:  # atomically: an existing file stays whole if the write fails
        buffer = io.BytesIO()
        np.save(buffer, logits.numpy(), allow_pickle=False)
        atomic_write_bytes(args.output, buffer.getvalue())
    result = {"model": str(args.model), "examples": len(x), "engine": model.engine, "isa": model.isa,
              "threads": torch.get_num_threads(), "seconds": seconds}
    if y is not None:
        result[f"{args.split}_error"] = int((predictions != y).sum()) / len(y)
    if args.json:
        print(json.dumps(result))
    elif y is not None:
        threads = f"{result['threads']} thread" + ("s" if result["threads"] != 1 else "")
        print(f"{args.split} error {100 * result[f'{args.split}_error']:.2f}% on {len(x):,} examples "
              f"({model.engine} engine{', ' + model.isa if model.isa else ''}, {threads}, {seconds:.2f}s)")
    elif args.output is None:
        print("\n".join(str(int(c)) for c in predictions))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="results table over seeds: test error per seed, mean ± sd",
                       description="Group run directories that differ only in their seed (and in options that do "
                                   "not change the experiment, like the device), and print for each group the "
                                   "test error at best validation of every seed, mean and sample standard "
                                   "deviation, best epochs and wall times. Unfinished runs are listed apart.")
    p.add_argument("runs", type=Path, nargs="+", help="run directories written by `binaryconnect train`")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="print a Markdown table")
    form.add_argument("--json", action="store_true", help="print the groups as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="also draw the training curves (validation error and training loss per epoch, one colour "
                        "per experiment, unfinished runs too) into FILE (.png, .pdf, .svg; needs matplotlib)")
    p.add_argument("--force", action="store_true", help="overwrite the --plot file if it exists")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args) -> int:
    from .report import format_report, read_run, report_dict

    if args.plot is not None and args.plot.exists() and not args.force:  # before any work: nothing is lost
        raise ConfigError(f"{args.plot} already exists; pass --force to overwrite it or choose another --plot")

    files = [path for path in args.runs if path.is_file()]  # a glob over a sweep's -o folder names its logs
    empty = [path for path in args.runs if path.is_dir() and rundir.unstarted(path)]  # starting, or killed early
    dirs = [path for path in args.runs if not path.is_file() and path not in empty]
    if not dirs:
        nothing = " (those given hold nothing yet: runs starting, or starts killed before they wrote)" if empty else ""
        raise ConfigError(f"no run directories among the paths given{nothing}: give the folders `binaryconnect "
                          "train` or `sweep` wrote")
    for skipped, one, many in ((files, "file given as run directories", "files given as run directories"),
                               (empty, "run directory with nothing written yet",
                                "run directories with nothing written yet")):
        if skipped:
            names = ", ".join(p.name for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            warnings.warn(f"skipped {len(skipped)} {one if len(skipped) == 1 else many} ({names})", stacklevel=1)
    runs = [read_run(path) for path in dirs]  # a directory named twice counts once (report.unique_runs)
    if args.json:
        print(json.dumps(report_dict(runs)))
    else:
        print(format_report(runs, markdown=args.markdown))
    if args.plot is not None:  # after the table: an error here loses nothing printed
        from .plot import plot_curves

        plot_curves(runs, args.plot)
        print(f"training curves written to {args.plot}", file=sys.stderr)
    return 0


def _add_export_c(sub) -> None:
    p = sub.add_parser("export-c", help="write a packed model (.bcnn) as portable C99 source (.h and .c)",
                       description="Write NAME.h and NAME.c: the network's packed tensors as constant arrays (1 "
                                   "bit per binary weight) and its layers in C99, with no allocation and no "
                                   "library call in the source (compilers may still emit memset: "
                                   "-ffreestanding for bare metal), for targets without Python: "
                                   "NAME_logits(input, logits), NAME_predict(input). See the README, \"C source\".")
    p.add_argument("model", type=Path, help="packed model file (.bcnn; `binaryconnect export RUN` makes one)")
    p.add_argument("-o", "--out", type=Path, required=True, help="folder to write NAME.h and NAME.c in (created)")
    p.add_argument("--name", default="bcnn_model", help="prefix of the files and the C functions (a C identifier; "
                                                        "default bcnn_model)")
    p.add_argument("--force", action="store_true", help="overwrite NAME.h / NAME.c if they exist")
    p.add_argument("--table-floats", type=_positive_int, default=None, metavar="N",
                   help="the most working memory, in floats, a binary stride-1 convolution's table of signed sums "
                        "may take: a larger layer runs in bands of output rows (at least one row; fewer rows "
                        "are slower); a binary linear layer whose byte tables (256 floats per 8 inputs) exceed "
                        "it takes half-byte tables (32 per 8 inputs, slower); lowers the working memory for "
                        "small targets (default 2097152, 8 MiB)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_export_c)


def _cmd_export_c(args) -> int:
    from .export import read_packed
    from .export.csource import TABLE_FLOATS, check_name, write_c_source

    check_name(args.name)  # before reading anything: a typo costs nothing
    if args.model.is_dir():
        raise ConfigError(f"{args.model} is a directory: export-c takes a packed .bcnn file; make one from a run "
                          f"directory with `binaryconnect export {args.model}`")
    written = write_c_source(read_packed(args.model), args.out, args.name, force=args.force,
                             table_floats=args.table_floats or TABLE_FLOATS)
    result = {"header": str(written.header), "source": str(written.source), "const_bytes": written.const_bytes,
              "scratch_bytes": 4 * written.scratch_floats, "layers": written.layers}
    if args.json:
        print(json.dumps(result))
    else:
        layers = f"{written.layers} layer" + ("s" if written.layers != 1 else "")
        print(f"wrote {written.header} and {written.source}: {layers}, {written.const_bytes:,} bytes of constants "
              f"(1 bit per binary weight), {4 * written.scratch_floats:,} bytes of working memory")
    return 0


def _add_summary(sub) -> None:
    p = sub.add_parser("summary", help="per-layer parameters, bytes and additions of a packed model or run",
                       description="Per layer and in total: parameters, binary parameters, bytes as float32 and "
                                   "as packed (the bytes on disk), compression, and the share of "
                                   "multiply-accumulates replaced by additions. A run directory is exported "
                                   "in memory first.")
    p.add_argument("path", type=Path, help="packed model (.bcnn), run directory or model.safetensors")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(handler=_cmd_summary)


def _cmd_summary(args) -> int:
    from .export import PackedNetwork, export_run
    from .export.summary import format_summary, summarize, summary_json

    path = args.path
    if path.is_file() and path.suffix != ".safetensors":
        data = path.read_bytes()
        net, title = PackedNetwork.from_bytes(data, str(path)), f"{path} ({len(data):,} bytes on disk)"
    else:
        net = export_run(path)
        data = net.to_bytes()
        if net.source.get("stochastic_weights"):  # export recalibrates such a run by default; its data are not read
            title = (f"{path}: not exported yet; `binaryconnect export --recalibrate 0` would write {len(data):,} "
                     "bytes; by default `export` recomputes a stochastic run's batch-norm statistics, which needs its "
                     "data, and records how in the file: about 150 bytes more")
        else:
            title = f"{path}: not exported yet; `binaryconnect export` would write {len(data):,} bytes"
    summary = summarize(net, data)
    print(summary_json(summary) if args.json else format_summary(summary, title))
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="several training runs side by side (recipes x seeds), then the report",
                       usage="binaryconnect sweep RECIPE [RECIPE ...] --seeds S[,S...] [options] [-- TRAIN OPTIONS]",
                       description="Run `binaryconnect train` for every recipe and seed, at most --jobs at a time, "
                                   "each in OUT/<recipe>-s<seed> with its log beside it, then print the report "
                                   "table. Options after `--` go to every train command (e.g. -- --device cuda "
                                   "--compile). Repeating a sweep skips finished runs and resumes stopped ones. "
                                   "Small networks leave a GPU mostly idle: several runs share one well.")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help=f"recipe names: {', '.join(list_recipes())}")
    p.add_argument("--seeds", required=True, type=_seed_list, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("-o", "--out", type=Path, default=Path("runs") / "sweep", help="folder of the run directories "
                   "(default: runs/sweep)")
    p.add_argument("-j", "--jobs", type=_positive_int, default=1, help="runs at the same time (default 1)")
    p.add_argument("--deadline", type=_duration, metavar="SECONDS",
                   help="after this long (seconds, or 9m, 1.5h), stop the runs still going (they checkpoint) and "
                        "start no more")
    p.add_argument("--markdown", action="store_true", help="print the report as a Markdown table")
    p.set_defaults(handler=_cmd_sweep, train_args=[])


def _seed_list(text: str) -> list[int]:
    seeds = [_non_negative_int(part.strip()) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated seeds, got {text!r}")
    return seeds


def _cmd_sweep(args) -> int:
    from .data import check_dataset_options
    from .report import format_report, read_run
    from .sweep import plan, prepare_data, run_jobs
    from .train import check_model_options, resolve_device

    if len(set(args.recipes)) != len(args.recipes):  # two processes would share one run directory
        raise ConfigError(f"a recipe is named twice: {' '.join(args.recipes)}")
    train_parser = build_parser()
    configs = {}
    for recipe in args.recipes:  # every run's options checked before any process starts
        train_args = train_parser.parse_args(["train", recipe, *args.train_args])  # argparse: exit 2
        for name, flag in (("seed", "--seed"), ("out", "--out"), ("resume", "--resume")):
            if getattr(train_args, name) is not None:
                raise ConfigError(f"{flag} after `--`: the sweep sets each run's seed and directory itself")
        configs[recipe] = config = _new_run_config(train_args)
        resolve_device(config.device)
        check_dataset_options(config.dataset, config.dataset_kwargs)
        check_model_options(config)  # before the data are prepared for runs that would all fail
    jobs = plan(args.recipes, args.seeds, args.out)
    for job in jobs:
        _check_existing_run(job, configs[job.recipe])
    log = lambda line: print(line, flush=True)  # noqa: E731 - as it happens, also into a file
    jobs = run_jobs(jobs, args.train_args, args.jobs, args.deadline, log=log,
                    prepare=lambda pending: prepare_data([configs[job.recipe] for job in pending], log))
    runs = [read_run(job.run_dir) for job in jobs if (job.run_dir / "config.json").is_file()]
    print()
    print(format_report(runs, markdown=args.markdown) if runs else "no run directories were written")
    left = [job for job in jobs if job.state not in ("finished", "skipped")]
    if left:
        diverged = [job for job in left if job.state == "diverged"]
        failed = [job for job in left if job.state == "failed"]
        print(f"\n{len(left)} of {len(jobs)} runs did not finish: "
              + ", ".join(f"{job.run_dir.name} ({job.state}{': ' + job.error if job.error else ''})" for job in left)
              + (("; fix what stopped the failed ones (their logs say more), then" if failed else ";")
                 + " repeat the same sweep command to resume or start them" if len(diverged) < len(left) else "")
              + ("; a repeat does not resume a diverged run (its loss became NaN/Inf, see its log): sweep "
                 "again with a lower --lr-start into another -o" if diverged else ""), file=sys.stderr)
        return 1
    return 0


def _check_existing_run(job, config) -> None:
    """A run directory a repeated sweep finds must hold the run the sweep asks for: the same options as
    ``config`` (seed aside) up to those a resume may change. More epochs than a finished run trained
    resume it (``job.more_epochs``); other differences are refused before anything starts."""
    from .config import RESUME_MAY_CHANGE, keeps_plan

    try:
        written = json.loads((job.run_dir / "config.json").read_text())
        saved, plan = written["config"], written.get("plan")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        saved = plan = None
    if not isinstance(saved, dict):
        return  # none yet, or damaged: the checkpoint decides when the run is resumed
    wanted = json.loads(json.dumps({**config.to_dict(), "seed": job.seed}))  # as JSON holds it
    differ = sorted(k for k in wanted.keys() | saved.keys()
                    if k not in RESUME_MAY_CHANGE and saved.get(k) != wanted.get(k))
    if differ:
        changes = "; ".join(f"{k} (run: {saved.get(k)!r}, asked: {wanted.get(k)!r})" for k in differ)
        raise ConfigError(f"{job.run_dir} holds a run with other options: {changes}; choose another -o, or "
                          "delete that run directory to train it anew")
    if (job.run_dir / "summary.json").is_file() and saved.get("epochs") != wanted["epochs"]:
        if keeps_plan(plan, saved.get("time_budget"), wanted["time_budget"], wanted["epochs"]):
            return  # a time budget planned its epochs under the cap the sweep asks for again: the run is done
        if wanted["epochs"] < saved.get("epochs", 0):
            raise ConfigError(f"{job.run_dir} has trained {saved['epochs']} epochs; ask for at least that many "
                              f"(--epochs), got {wanted['epochs']}")
        job.more_epochs = True


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="binaryconnect", description=__doc__.split("\n\n")[0])
    from . import __version__

    parser.add_argument("--version", action="version", version=f"binaryconnect {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_train, _add_sweep, _add_evaluate, _add_recipes, _add_report, _add_export, _add_export_c,
                _add_predict, _add_summary):
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line as one line each, without the source line that raised them."""
    text = " ".join(str(message).split()).removeprefix("binaryconnect: ")  # library warnings name the package
    return "binaryconnect: warning: " + text + "\n"


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's flush at exit finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (output captured in-process)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if argv[:1] == ["sweep"] and "--" in argv:  # sweep: what follows `--` is for every train command
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if args.command == "sweep":
        args.train_args = train_args
    formatwarning, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.handler(args)
    except _Terminated as exc:  # SIGTERM before training handled it
        print(f"binaryconnect: {exc}", file=sys.stderr)
        return 143
    except TrainingInterrupted as exc:  # a clean stop, not an error: exit code 130 (SIGINT) or 143 (SIGTERM)
        print(f"binaryconnect: {exc}", file=sys.stderr)
        return exc.exit_code
    except BinaryConnectError as exc:  # one line, also where a library's message had several (a compiler's
        text = str(exc) if getattr(exc, "verbatim", False) else " ".join(str(exc).split())  # output stays as is)
        print(f"binaryconnect: error: {text}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("binaryconnect: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of the output went away (`binaryconnect recipes | head -3`): stop quietly,
        _silence_stdout()  # as other command-line tools do, with the exit code of a SIGPIPE (128 + 13)
        return 141
    except OSError as exc:  # a path that cannot be written (missing, read-only, a file where a folder goes), a
        paths = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)  # full disk: one line, exit 1
        print(f"binaryconnect: error: {exc.strerror or exc}{': ' + paths if paths else ''} (check the path, its "
              "permissions and the free space)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
