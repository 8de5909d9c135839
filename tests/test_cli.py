"""The command line end to end: train, evaluate, recipes, and its error messages."""

import json
import os
import subprocess
import sys

import pytest
import torch

from binaryconnect.cli import main
from binaryconnect.data import load_dataset
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
        (["evaluate", "/nonexistent/run"], "/nonexistent/run does not exist"),
    ],
)
def test_bad_input_gives_one_clear_line(argv, message, capsys, tmp_path):
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


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch, capsys):
    """`binaryconnect recipes | head -3`: the closed pipe ends the command with SIGPIPE's exit code (141)
    and nothing on stderr, where it printed an error about paths and free space."""
    from binaryconnect import cli

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_recipes", reader_gone)
    assert main(["recipes"]) == 141 and capsys.readouterr().err == ""
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
