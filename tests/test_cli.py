"""The command line end to end: train, evaluate, recipes, and its error messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from binaryconnect.cli import main
from binaryconnect.config import recipe_config
from binaryconnect.data import load_dataset
from binaryconnect.errors import ConfigError
from binaryconnect.layers import set_generator, set_stochastic_eval
from binaryconnect.train import evaluate, load_run
from helpers import assert_one_line_error

SMALL = ["--train-subset", "1000", "--hidden", "32", "--depth", "1", "--epochs", "2", "--device", "cpu",
         "--no-progress"]


def test_train_then_evaluate(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    assert main(["train", "mnist-stochastic", "--data-dir", str(data_root), "-o", str(run), "--seed", "3",
                 *SMALL]) == 0
    out = capsys.readouterr().out
    assert "epoch    2/2" in out and "done: test error" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["binarization"] == "stochastic"

    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--json", "--split", "both"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_error"] == summary["test_error"]  # real-valued weights, as during training
    assert result["val_error"] == summary["best_val_error"]
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--json", "--stochastic-eval", "sample",
                 "--samples", "4"]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert sampled["stochastic_eval"] == "sample" and sampled["samples"] == 4
    # oracle: the same model, sampled weights from the same seed (--seed 0), 4 samples averaged
    model, _ = load_run(run)
    set_stochastic_eval(model, "sample")
    set_generator(model, torch.Generator().manual_seed(0))
    mnist = load_dataset("mnist", data_root, download=False)
    error, loss = evaluate(model, mnist.test_x, mnist.test_y, 1000, 4)
    assert (sampled["test_error"], sampled["test_loss"]) == (error, loss)
    assert sampled["test_error"] != result["test_error"]  # sampled weights are not the real ones
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--json", "--stochastic-eval", "sample",
                 "--samples", "4", "--split", "both"]) == 0
    both = json.loads(capsys.readouterr().out)  # the test split's samples do not depend on the val split's
    assert (both["test_error"], both["test_loss"]) == (error, loss)

    # options that would change nothing are refused, not echoed as if they applied
    assert main(["evaluate", str(run), "--data-dir", str(data_root), "--samples", "16"]) == 2
    assert "--samples 16 averages sampled binary weights: add --stochastic-eval sample" in capsys.readouterr().err
    assert "samples" not in result  # real-valued weights: one output, no sample count reported
    det = tmp_path / "det"
    assert main(["train", "mnist-deterministic", "--data-dir", str(data_root), "-o", str(det), "-q", *SMALL]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(det), "--data-dir", str(data_root), "--stochastic-eval", "sample"]) == 2
    assert "apply to stochastic runs; " in capsys.readouterr().err
    averaged = tmp_path / "averaged"  # a run evaluated with 3 samples in training: 3 by default here too
    assert main(["train", "mnist-stochastic", "--stochastic-eval", "sample", "--eval-samples", "3", "--data-dir",
                 str(data_root), "-o", str(averaged), "-q", *SMALL]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(averaged), "--data-dir", str(data_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 3


def test_recipes_lists_the_paper_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("mnist-float", "mnist-deterministic", "mnist-stochastic"):
        assert name in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "mnist-nope"], "unknown recipe 'mnist-nope'; known recipes:"),
        (["train"], "name a recipe"),
        (["train", "mnist-float", "--lr-start", "-1"], "argument --lr-start: expected a positive number, got '-1'"),
        (["train", "mnist-float", "--epochs", "0"], "argument --epochs: expected a positive integer"),
        (["train", "mnist-float", "--binarization", "sign"], "argument --binarization: invalid choice"),
        (["train", "mnist-float", "--compile-mode", "fast"], "argument --compile-mode: invalid choice"),
        (["train", "mnist-float", "--device", "tpu"], "device must be one of auto, cpu, cuda"),
        (["train", "mnist-float", "--device", "cuda:x"], "cuda or cuda:N, got 'cuda:x'"),
        (["train", "mnist-float", "--batch-size", "1"], "batch_size must be at least 2: batch norm"),
        (["train", "mnist-float", "--seed", str(2**64 - 2)], "seed must be an integer from 0 to 4294967295"),
        (["train", "mnist-float", "--H", "1e39"], "H must lie in float32's normal range"),
        (["train", "mnist-float", "--dataset-option", "val_size=5000"], "use --val-size"),
        (["train", "mnist-float", "--dataset-option", "download=false"], "use --no-download"),
        (["train", "mnist-float", "--dataset-option", "verify=False"],
         "option verify must be bool like its default true, got 'False' (on the command line: --dataset-option "
         "verify=true)"),
        (["evaluate", "/nonexistent/run", "--device", "meta"], "unknown device 'meta'; use auto, cpu, cuda"),
        (["train", "mnist-float", "--data-dir", "/nonexistent/dir", "--no-download"], "MNIST not found"),
        (["train", "mnist-float", "--train-subset", "50001", "--data-dir", "DATA"],
         "train_subset 50001 is more than the 50000 training examples of mnist: give at most 50000"),
        # a model option the model lacks: refused before the data are read (here there are none to read)
        (["train", "cifar10-deterministic", "--depth", "2", "--data-dir", "/nonexistent/dir", "--no-download"],
         "bad options for model 'convnet': no option 'depth'; its options: input_shape, num_classes, channels"),
        (["evaluate", "/nonexistent/run"], "/nonexistent/run does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(argv, message, capsys, tmp_path, data_root):
    argv = [str(data_root) if a == "DATA" else a for a in argv]
    if argv[0] == "train":
        argv = [*argv, "-o", str(tmp_path / "r")]
    assert_one_line_error(argv, message, capsys)
    assert not (tmp_path / "r").exists()  # nothing was written


def test_refuses_to_overwrite_a_run(tmp_path, data_root, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    assert main(["train", "mnist-float", "--data-dir", str(data_root), "-o", str(run), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == "{}"


def test_console_script_is_installed(tmp_path, data_root):
    env = {**os.environ, "BINARYCONNECT_DATA": str(data_root)}
    exe = os.path.join(os.path.dirname(sys.executable), "binaryconnect")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "binaryconnect"]
    proc = subprocess.run([*cmd, "train", "mnist-deterministic", "-o", str(tmp_path / "r"), "-q", *SMALL],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    # 1,000 images, 2 epochs of a 32-unit net: 0.459 measured (seed 0, torch 2.14.1, CPU); chance is 0.9
    assert summary["test_error"] < 0.6 and (tmp_path / "r" / "model.safetensors").is_file()



def test_ctrl_c_while_pytorch_imports_ends_with_one_line(monkeypatch, capsys):
    """The console script's entry point imports the command line (and PyTorch, a second or more) inside its
    handler: a KeyboardInterrupt raised by that import gives the same one line and exit code 130 as later."""
    import importlib.abc

    import binaryconnect.__main__ as entry

    class InterruptedImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "binaryconnect.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "binaryconnect.cli")
    monkeypatch.setattr(sys, "meta_path", [InterruptedImport(), *sys.meta_path])
    assert entry.main(["recipes"]) == 130
    assert capsys.readouterr().err == "binaryconnect: interrupted\n"
    monkeypatch.undo()  # with the import allowed, the entry point is the command line
    assert entry.main(["recipes"]) == 0 and "mnist-deterministic" in capsys.readouterr().out


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """`binaryconnect recipes | head -3`, in a real process: the closed pipe ends the command with SIGPIPE's
    exit code (141) and nothing on stderr, where it printed an error about paths and free space."""
    proc = subprocess.Popen([sys.executable, "-m", "binaryconnect", "recipes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command writes: it is still importing PyTorch
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_importing_the_package_does_not_import_pytorch_until_a_name_is_used():
    code = ("import sys, binaryconnect as bc; a = 'torch' in sys.modules; layer = bc.BinaryLinear(3, 2); "
            "print(a, 'torch' in sys.modules, type(layer).__module__, sorted(bc.__all__) == sorted(set(dir(bc)) & "
            "set(bc.__all__)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True", "binaryconnect.layers", "True"], out.stderr
    import binaryconnect

    assert sorted(binaryconnect.__all__) == sorted(binaryconnect._MODULE_OF)  # each public name has its module
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        binaryconnect.nope  # noqa: B018


def test_errors_and_warnings_print_as_one_line(monkeypatch, capsys):
    import warnings

    from binaryconnect import cli
    from binaryconnect.errors import DataError

    def failing(args):
        raise DataError("a message a library\nspread over\n  three lines")

    def warns(args):
        assert warnings.formatwarning is cli._one_line_warning  # while the command runs
        return 0

    before = warnings.formatwarning
    monkeypatch.setattr(cli, "_cmd_recipes", failing)
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err == "binaryconnect: error: a message a library spread over three lines\n"
    monkeypatch.setattr(cli, "_cmd_recipes", warns)
    assert main(["recipes"]) == 0
    assert warnings.formatwarning is before  # restored: a program calling main() keeps its own format
    # warnings (the JPEG copy of CIFAR-10 gives one) print as one line, without the source line
    assert cli._one_line_warning("a library's\nwarning", UserWarning, "lib.py", 7, "warn(...)") == (
        "binaryconnect: warning: a library's warning\n")
    assert cli._one_line_warning("binaryconnect: compiled kernels unavailable", RuntimeWarning, "e.py", 1) == (
        "binaryconnect: warning: compiled kernels unavailable\n")  # the package named once


def test_every_train_option_reaches_the_configuration():
    """Each ``train`` option, given on the command line, is the configuration's value (the recipe's other
    values kept): none is dropped on the way from argparse to TrainConfig."""
    from binaryconnect.cli import _new_run_config, build_parser

    argv = ["train", "mnist-float", "--data-dir", "/d", "--no-download", "--binarization", "stochastic", "--H", "0.5",
            "--ste", "clipped", "--stochastic-eval", "sample", "--eval-samples", "3", "--lr-scale", "none",
            "--epochs", "7", "--batch-size", "64", "--lr-start", "0.002", "--lr-end", "0.0001", "--hidden", "32",
            "--depth", "0", "--val-size", "5000", "--train-subset", "900", "--dataset", "mnist", "--preprocess",
            "center", "--augment", "crop", "--dataset-option", "verify=false", "--compile-mode",
            "max-autotune-no-cudagraphs", "--amp", "bf16", "--channels-last", "--cuda-graph", "--seed", "9",
            "--device", "cuda:1", "--deterministic", "--checkpoint-every", "50", "--checkpoint-seconds", "0",
            "--time-budget", "540"]
    config = _new_run_config(build_parser().parse_args(argv)).to_dict()
    assert config == {
        "dataset": "mnist", "model": "mlp", "model_kwargs": {"hidden": 32, "depth": 0, "bn_momentum": 0.15},
        "dataset_kwargs": {"verify": False, "preprocess": "center", "augment": "crop"}, "binarization": "stochastic",
        "H": 0.5, "ste": "clipped", "stochastic_eval": "sample", "eval_samples": 3, "lr_scale": "none", "epochs": 7,
        "batch_size": 64, "lr_start": 0.002, "lr_end": 0.0001, "val_size": 5000, "train_subset": 900, "seed": 9,
        "device": "cuda:1", "deterministic": True, "compile": True, "compile_mode": "max-autotune-no-cudagraphs",
        "amp": "bf16", "channels_last": True, "cuda_graph": True, "eval_batch_size": 1000, "recipe": "mnist-float",
        "data_dir": "/d", "download": False, "checkpoint_every": 50, "checkpoint_seconds": 0.0,
        "time_budget": 540.0}


@pytest.mark.parametrize("argv, message", [
    (["train", "mnist-float", "--lr-start", "inf"], "argument --lr-start: expected a positive number, got 'inf'"),
    (["train", "mnist-float", "--checkpoint-seconds", "inf"], "argument --checkpoint-seconds: expected a non-negative"),
    (["sweep", "mnist-float", "--seeds", "0", "--deadline", "0"], "argument --deadline: expected a positive duration"),
    (["sweep", "mnist-float", "--seeds", "0", "--deadline", "inf"],
     "argument --deadline: expected a positive duration (540, 540s, 9m, 1.5h), got 'inf'"),
    (["sweep", "mnist-float", "--seeds", "0", "-j", "0"], "argument -j/--jobs: expected a positive integer, got '0'"),
    (["sweep", "mnist-float", "--seeds", "0,-1"], "argument --seeds: expected a non-negative integer, got '-1'"),
    (["report", "/r", "--json", "--markdown"], "argument --markdown: not allowed with argument --json"),
    (["evaluate", "/r", "--samples", "0"], "argument --samples: expected a positive integer"),
])
def test_option_types_refuse_what_they_must(argv, message, capsys):
    assert_one_line_error(argv, message, capsys)


def test_option_defaults_and_the_edges_they_accept():
    """Defaults of sweep and evaluate, and the smallest values the number types accept: 0 seconds between
    checkpoints, 0 hidden layers, seed 0; a trailing comma in --seeds is no seed."""
    from pathlib import Path

    from binaryconnect.cli import build_parser

    parse = build_parser().parse_args
    s = parse(["sweep", "mnist-float", "--seeds", "2, 0,"])
    assert (s.seeds, s.jobs, s.out, s.deadline, s.markdown) == ([2, 0], 1, Path("runs") / "sweep", None, False)
    assert parse(["sweep", "mnist-float", "--seeds", "0", "--deadline", "0.5", "-j", "3"]).deadline == 0.5
    e = parse(["evaluate", "r"])
    assert (e.split, e.samples, e.seed, e.batch_size, e.device, e.stochastic_eval, e.json) == (
        "test", None, 0, 1000, "auto", None, False)  # samples: the run's --eval-samples
    t = parse(["train", "mnist-float", "--checkpoint-seconds", "0", "--depth", "0", "--seed", "0"])
    assert (t.checkpoint_seconds, t.depth, t.seed) == (0.0, 0, 0)
    assert all(getattr(t, name) is None for name in ("epochs", "batch_size", "lr_start", "H", "compile", "download"))


def test_recipes_table_gives_each_recipes_schedule(capsys):
    """`binaryconnect recipes`: one line per recipe with its dataset, model, binarization, epochs, batch size
    and learning rates (the paper's values, written out here)."""
    assert main(["recipes"]) == 0
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert len(lines) == 15
    assert lines["mnist-deterministic"] == ["mnist", "mlp", "deterministic", "epochs", "250", "batch", "100", "lr",
                                            "0.001", "->", "3e-06"]
    assert lines["cifar10-float"] == ["cifar10", "convnet", "none", "epochs", "500", "batch", "50", "lr", "0.003",
                                      "->", "2e-06"]
    assert lines["svhn-stochastic"] == ["svhn", "convnet", "stochastic", "epochs", "200", "batch", "50", "lr", "0.01",
                                        "->", "3e-06"]


def test_train_run_directory_default_and_an_empty_one(tmp_path, monkeypatch, capsys):
    """Without -o the run goes to runs/<recipe>-s<seed>-<date>-<time> (the seed the configuration has,
    0 unless given); an existing empty directory is used, not refused. fit is replaced by a recorder."""
    import re

    from binaryconnect import train

    dirs = []
    monkeypatch.setattr(train, "fit", lambda config, run_dir, **kw: dirs.append(run_dir) or {"test_error": 0.5})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "mnist-float", "-q"]) == 0
    assert main(["train", "mnist-stochastic", "--seed", "4", "-q"]) == 0
    (tmp_path / "empty").mkdir()
    assert main(["train", "mnist-float", "-o", "empty", "-q"]) == 0
    assert re.fullmatch(r"runs/mnist-float-s0-\d{8}-\d{6}", str(dirs[0]))
    assert re.fullmatch(r"runs/mnist-stochastic-s4-\d{8}-\d{6}", str(dirs[1]))
    assert str(dirs[2]) == "empty"
    assert capsys.readouterr().out.splitlines() == ['{"test_error": 0.5}'] * 3  # -q: the summary, as JSON


def test_a_run_with_a_relative_data_dir_is_evaluated_exported_predicted_and_resumed_elsewhere(
        tmp_path, data_root, monkeypatch, capsys):
    """`--data-dir reldata`, relative to the folder the run was started from, is recorded absolute: evaluate,
    export --evaluate, predict and --resume run from another folder (no --data-dir, no $BINARYCONNECT_DATA)
    find it. A recorded data dir that does not exist here (a run trained on another machine) gives way to
    $BINARYCONNECT_DATA, and the error says so when nothing is found."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    (project / "reldata").symlink_to(data_root, target_is_directory=True)
    monkeypatch.delenv("BINARYCONNECT_DATA", raising=False)
    monkeypatch.chdir(project)
    run = tmp_path / "run"
    assert main(["train", "mnist-deterministic", "--data-dir", "reldata", "-o", str(run), "-q", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == summary["test_error"]
    assert main(["export", str(run), "--evaluate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_test_error"] == summary["test_error"]
    assert main(["predict", str(run / "model.bcnn"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 10_000
    assert main(["train", "--resume", str(run), "--epochs", "3", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs"] == 3

    assert json.loads((run / "config.json").read_text())["config"]["data_dir"] == str(project / "reldata")
    (elsewhere / "reldata").mkdir()  # a folder of the given name here, holding no MNIST: not the run's
    assert main(["evaluate", str(run), "--json"]) == 0
    capsys.readouterr()

    (project / "reldata").unlink()  # the recorded folder is gone: $BINARYCONNECT_DATA, else ./data
    assert main(["evaluate", str(run), "--json"]) == 2
    err = capsys.readouterr().err
    assert "MNIST not found: data/MNIST/raw lacks" in err
    assert f"(the run's data folder {project / 'reldata'} is not here)" in err
    monkeypatch.setenv("BINARYCONNECT_DATA", str(data_root))
    assert main(["evaluate", str(run), "--json"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "4", "-q", "--no-download"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["epochs"] == 4


def test_a_tilde_data_dir_is_the_home_folder_for_training_and_evaluation(tmp_path, data_root, monkeypatch, capsys):
    """`--data-dir '~/x'` (quoted: the shell leaves it) means the home folder's x, when training and when
    evaluating (before, training took it literally, ./~/x, and evaluation expanded it)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "mnistroot").symlink_to(data_root, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("BINARYCONNECT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "mnist-float", "--data-dir", "~/mnistroot", "-o", str(run), "-q", *SMALL]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_error"] == summary["test_error"]


def test_runs_started_together_never_share_a_run_directory(tmp_path, monkeypatch, capsys):
    """A new run claims its directory with a file created exclusively before it writes anything. Runs
    started in the same second without -o get numbered directories (the default name is taken, by a
    finished run or by one starting); a --out another run is starting in is refused, nothing written; the
    claim is gone once the run ends, and a failed start leaves no directory behind."""
    import time as time_module

    from binaryconnect import cli, rundir, train

    seen = []

    def fake_fit(config, run_dir, **kw):
        seen.append((run_dir, sorted(f.name for f in run_dir.iterdir())))
        (run_dir / "model.safetensors").write_text("x")
        return {"test_error": 0.5}

    monkeypatch.setattr(train, "fit", fake_fit)
    monkeypatch.setattr(time_module, "strftime", lambda fmt, *a: "20261126-120000")
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "runs" / "mnist-float-s0-20261126-120000"
    assert main(["train", "mnist-float", "-q"]) == 0
    (tmp_path / "runs" / "mnist-float-s0-20261126-120000-2").mkdir()
    held = _hold_claim(tmp_path / "runs" / "mnist-float-s0-20261126-120000-2" / rundir.CLAIM)  # a run starting in it
    assert main(["train", "mnist-float", "-q"]) == 0
    assert [(str(d), files) for d, files in seen] == [
        ("runs/mnist-float-s0-20261126-120000", [rundir.CLAIM]),
        ("runs/mnist-float-s0-20261126-120000-3", [rundir.CLAIM])]
    assert not (base / rundir.CLAIM).exists() and (base / "model.safetensors").exists()

    starting = tmp_path / "starting"
    starting.mkdir()
    held2 = _hold_claim(starting / rundir.CLAIM)
    assert main(["train", "mnist-float", "-o", str(starting), "-q"]) == 2
    assert "is in use: another binaryconnect process is starting or training a run in it" in capsys.readouterr().err
    assert sorted(f.name for f in starting.iterdir()) == [rundir.CLAIM] and len(seen) == 2
    os.close(held2)  # its process gone (SIGKILL): the claim no one holds is taken over
    assert main(["train", "mnist-float", "-o", str(starting), "-q"]) == 0
    assert seen[-1] == (starting, [rundir.CLAIM])
    assert sorted(f.name for f in starting.iterdir()) == ["model.safetensors"]
    os.close(held)
    (tmp_path / "afile").write_text("x")
    assert main(["train", "mnist-float", "-o", str(tmp_path / "afile"), "-q"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err

    def failing_fit(config, run_dir, **kw):
        raise cli.ConfigError("no data")

    monkeypatch.setattr(train, "fit", failing_fit)
    assert main(["train", "mnist-float", "-o", "fresh/deeper/run", "-q"]) == 2
    assert not (tmp_path / "fresh").exists()  # the folders made for it too


def _hold_claim(path):
    """Create and lock a claim file as a starting run does; return the descriptor (closing it releases it)."""
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize("written, message", [
    ("checkpoint.safetensors", "stopped (SIGTERM) as training started, with a checkpoint: continue with "
                               "`binaryconnect train --resume {run}`"),
    ("summary.json", "terminated (SIGTERM) as the run ended; it finished: {run}")])
def test_sigterm_outside_trainings_own_handler_keeps_what_the_run_wrote(tmp_path, written, message):
    """SIGTERM after the run wrote its first checkpoint or its summary, but while training's own handler is
    not installed (it starts after the data load and ends before the last writes): exit 143, the run
    directory kept, and the message says what to do with it, not "nothing was written"."""
    import signal
    import time

    run = tmp_path / "run"
    code = ("import time, sys; from binaryconnect import train, cli\n"
            f"train.fit = lambda config, run_dir, **k: ((run_dir / {written!r}).write_text('{{}}'), "
            "(run_dir / 'wrote').write_text(''), time.sleep(60))\n"
            f"sys.exit(cli.main(['train', 'mnist-float', '-o', {str(run)!r}, '-q']))")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "wrote").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert f"binaryconnect: {message.format(run=run)}" in err
    assert (run / written).is_file()


def test_a_run_directory_is_claimed_and_released_with_sigint_and_sigterm_blocked(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM cannot land halfway through making or releasing the claim on a new run directory:
    both are blocked then (a signal that came meanwhile is raised once the claim is whole), and unblocked
    while training runs."""
    import signal

    from binaryconnect import rundir, train

    blocked = {}
    claim_new = rundir.claim_new

    def recording_claim_new(*args, **kwargs):
        blocked["claim"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        claim = claim_new(*args, **kwargs)
        release = claim.release

        def recording_release():
            blocked["release"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
            release()
        claim.release = recording_release
        return claim

    def fit(config, run_dir, **kwargs):
        blocked["fit"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return {}

    monkeypatch.setattr(rundir, "claim_new", recording_claim_new)
    monkeypatch.setattr(train, "fit", fit)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert main(["train", "mnist-float", "-o", str(tmp_path / "run")]) == 0
    stops = {signal.SIGINT, signal.SIGTERM}
    assert stops <= blocked["claim"] and stops <= blocked["release"]
    assert not stops & blocked["fit"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_a_second_sigterm_during_the_clean_up_is_ignored():
    """The first SIGTERM before training starts raises (the claim is then released); the handler first
    ignores SIGTERM, so that a second one cannot cut the release short."""
    import signal

    from binaryconnect import cli

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(cli._Terminated, match="before training started; nothing was written"):
            cli._on_sigterm(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_start_killed_while_loading_leaves_nothing_that_blocks_the_next(tmp_path, sig):
    """SIGTERM while a new run loads its data: exit 143 and no run directory. SIGKILL: the claim file stays,
    held by no process, and the next start with the same --out takes it over."""
    import signal
    import time

    from binaryconnect import rundir

    run = tmp_path / "run"
    code = ("import time, sys; from binaryconnect import train, cli\n"
            "train.fit = lambda *a, **k: time.sleep(60)  # a long data load\n"
            f"sys.exit(cli.main(['train', 'mnist-float', '-o', {str(run)!r}, '-q']))")
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / rundir.CLAIM).exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    time.sleep(0.2)  # the lock is taken right after the file is created
    process.send_signal(getattr(signal, sig))
    _, err = process.communicate(timeout=60)
    if sig == "SIGTERM":
        assert process.returncode == 143 and "terminated (SIGTERM) before training started" in err
        assert not run.exists()
    else:
        assert process.returncode == -signal.SIGKILL and sorted(f.name for f in run.iterdir()) == [rundir.CLAIM]
        again = ("from binaryconnect import train, cli\n"
                 "train.fit = lambda config, run_dir, **k: (run_dir / 'summary.json').write_text('{}') and {}\n"
                 f"raise SystemExit(cli.main(['train', 'mnist-float', '-o', {str(run)!r}]))")
        result = subprocess.run([sys.executable, "-c", again], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert sorted(f.name for f in run.iterdir()) == ["summary.json"]


def test_interrupt_os_error_and_closed_pipe_exit_codes(monkeypatch, capsys, tmp_path):
    """Ctrl-C in a command: exit code 130 and one line; an unwritable path: exit code 1 and one line naming
    the path (not 2, which says the input was wrong); the output's reader gone (a BrokenPipeError, itself an
    OSError): exit code 141 and nothing on stderr."""
    from binaryconnect import cli

    def interrupted(args):
        raise KeyboardInterrupt

    def unwritable(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_recipes", interrupted)
    assert main(["recipes"]) == 130 and capsys.readouterr().err == "binaryconnect: interrupted\n"
    monkeypatch.setattr(cli, "_cmd_recipes", unwritable)
    assert main(["recipes"]) == 1
    assert capsys.readouterr().err == (f"binaryconnect: error: Permission denied: {tmp_path / 'x'} (check the path, "
                                       "its permissions and the free space)\n")
    monkeypatch.setattr(cli, "_cmd_recipes", reader_gone)
    assert main(["recipes"]) == 141 and capsys.readouterr().err == ""


@pytest.mark.parametrize("options, message", [
    ({"epochs": 0}, "epochs must be a positive integer, got 0"),
    ({"epochs": True}, "epochs must be a positive integer, got True"),
    ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer, got 0"),
    ({"eval_samples": 0}, "eval_samples must be a positive integer, got 0"),
    ({"val_size": 0}, "val_size must be a positive integer, got 0"),
    ({"train_subset": 0}, "train_subset must be a positive integer, got 0"),
    ({"checkpoint_every": 0}, "checkpoint_every must be a positive integer, got 0"),
    ({"checkpoint_seconds": float("inf")}, "checkpoint_seconds must be a non-negative number, got inf"),
    ({"seed": 2**32}, "seed must be an integer from 0 to 4294967295, got 4294967296"),
    ({"seed": -1}, "seed must be an integer from 0 to 4294967295, got -1"),
    ({"seed": True}, "seed must be an integer from 0 to 4294967295, got True"),
    ({"H": 1.1754943508222874e-38 / 2}, "H must lie in float32's normal range"),
    ({"H": 3.41e38}, "H must lie in float32's normal range"),
    ({"lr_end": 1.0000001e-3}, "lr_end (0.0010000001) must not exceed lr_start (0.001)"),
    ({"device": "cuda:"}, "device must be one of auto, cpu, cuda or cuda:N, got 'cuda:'"),
    ({"dataset_kwargs": {"root": "/d"}}, "root is not a dataset option here but a training option: use --data-dir"),
    ({"compile": "yes"}, "compile must be true or false, got 'yes'"),
])
def test_every_bound_of_the_configuration_is_checked(options, message):
    with pytest.raises(ConfigError) as info:
        recipe_config("mnist-float", **options)
    assert message in str(info.value)


def test_the_edges_of_the_configuration_are_accepted():
    """The limits themselves are valid: seed 0 and 2**32 - 1, H at float32's smallest and largest normal
    numbers, lr_end equal to lr_start, batch size 2, 0 seconds between checkpoints, cuda:0."""
    for options in ({"seed": 0}, {"seed": 2**32 - 1}, {"H": 1.1754943508222875e-38}, {"H": 3.4028234663852886e38},
                    {"lr_end": 1e-3}, {"batch_size": 2, "epochs": 1, "val_size": 1}, {"checkpoint_seconds": 0},
                    {"device": "cuda:0"}):
        config = recipe_config("mnist-float", **options)
        assert all(getattr(config, k) == v for k, v in options.items())


def test_options_merge_into_the_recipes_mappings():
    """A model or dataset option replaces that key of the recipe's mapping and keeps the others; None
    keeps the recipe's value."""
    assert recipe_config("mnist-float", model_kwargs={"hidden": 32}).model_kwargs == {
        "hidden": 32, "depth": 3, "bn_momentum": 0.15}
    assert recipe_config("cifar10-float", dataset_kwargs={"augment": "crop"}).dataset_kwargs == {
        "preprocess": "gcn-zca", "augment": "crop"}
    assert recipe_config("svhn-float", epochs=None, model_kwargs=None).epochs == 200
