"""fit(): the run directory, best-validation selection, evaluation modes, and a real MNIST epoch."""

import json

import pytest
import torch

from binaryconnect import train
from binaryconnect.checkpoint import load_tensors
from binaryconnect.config import TrainConfig, recipe_config
from binaryconnect.errors import ConfigError
from binaryconnect.layers import binary_layers, set_generator, set_stochastic_eval
from binaryconnect.losses import square_hinge_loss
from binaryconnect.models import create_model
from binaryconnect.train import evaluate, fit, load_run


def _small(**kw):
    base = dict(train_subset=2000, epochs=3, batch_size=100, lr_start=3e-3, lr_end=1e-3, device="cpu",
                model_kwargs={"hidden": 64, "depth": 2})
    return recipe_config("mnist-deterministic", **{**base, **kw})


@pytest.mark.parametrize("binarization", ["deterministic", "stochastic", "none"])
def test_fit_writes_run_dir_and_selects_best_validation(tmp_path, mnist, binarization):
    config = _small(binarization=binarization)
    summary = fit(config, tmp_path / "run", progress=False, log=lambda *a: None, data=mnist)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.json", "metrics.jsonl", "model.safetensors", "summary.json"}
    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == config
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert {"lr", "train_loss", "val_error", "test_error", "seconds"} <= rows[0].keys()
    assert rows[0]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] == pytest.approx(1e-3)
    best = min(rows, key=lambda r: (r["val_error"], -r["epoch"]))  # ties go to the later epoch
    assert summary["best_epoch"] == best["epoch"]
    assert summary["test_error"] == best["test_error"]
    assert json.loads((run / "summary.json").read_text())["test_error"] == summary["test_error"]
    # it learned from 2000 images: seed 0 measured 0.148 / 0.234 / 0.128 (deterministic / stochastic / float,
    # torch 2.14.1, CPU); chance is 0.9. The margin allows for other builds' rounding, not for a broken loop.
    assert summary["test_error"] < {"deterministic": 0.25, "stochastic": 0.33, "none": 0.23}[binarization]

    # the saved model is the best one: evaluating it reproduces the recorded errors exactly
    model, loaded = load_run(run)
    assert loaded == config
    val_error, _ = evaluate(model, mnist.val_x, mnist.val_y)
    test_error, _ = evaluate(model, mnist.test_x, mnist.test_y)
    assert (val_error, test_error) == (best["val_error"], best["test_error"])
    for layer in binary_layers(model):  # latent weights stayed in [-H, H]
        if layer.is_binary:
            assert layer.weight.abs().max() <= layer.H


def test_same_seed_same_weights(tmp_path, mnist):
    # (without --deterministic; that another seed reaches the weights, the shuffling and the sampling is
    # test_reliability_guards.py::test_same_seed_is_bit_identical_and_another_seed_is_not)
    runs = []
    for i in range(2):
        fit(_small(binarization="stochastic", epochs=1, seed=0), tmp_path / str(i), progress=False,
            log=lambda *a: None, data=mnist)
        runs.append(load_run(tmp_path / str(i))[0].state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("val_errors, best_epoch", [([0.30, 0.20, 0.25], 2), ([0.30, 0.20, 0.20], 3)])
def test_best_validation_epoch_is_kept_with_its_model(tmp_path, mnist, monkeypatch, val_errors, best_epoch):
    # evaluate() scripted: validation errors that fall then rise (the best epoch is not the last), and a
    # tie (the later epoch wins, as in the original code); the model file must hold that epoch's weights
    from binaryconnect import train

    snapshots, calls = [], {"n": 0}

    def scripted(model, x, y, batch_size=1000, samples=1):
        epoch, is_val = divmod(calls["n"], 2)[0], calls["n"] % 2 == 0
        calls["n"] += 1
        if is_val:
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return val_errors[epoch], 0.0
        return 0.5 - 0.1 * epoch, 0.0  # test errors 0.5, 0.4, 0.3

    monkeypatch.setattr(train, "evaluate", scripted)
    summary = fit(_small(), tmp_path / "run", progress=False, log=lambda *a: None, data=mnist)
    assert summary["best_epoch"] == best_epoch
    assert summary["best_val_error"] == val_errors[best_epoch - 1]
    assert summary["test_error"] == pytest.approx(0.5 - 0.1 * (best_epoch - 1))
    saved, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    expected = snapshots[best_epoch - 1]
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    assert not all(torch.equal(saved[k], snapshots[-1][k]) for k in expected) or best_epoch == 3


def test_train_loss_is_the_mean_of_the_epochs_step_losses(tmp_path, mnist, monkeypatch):
    from binaryconnect import train

    losses = []

    def recording(output, labels):
        loss = square_hinge_loss(output, labels)
        if torch.is_grad_enabled():  # training steps; evaluate() runs without gradients
            losses.append(loss.item())
        return loss

    monkeypatch.setattr(train, "square_hinge_loss", recording)
    fit(_small(epochs=2), tmp_path / "run", progress=False, log=lambda *a: None, data=mnist)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = 2000 // 100
    assert len(losses) == 2 * steps
    for epoch, row in enumerate(rows):
        assert row["train_loss"] == pytest.approx(sum(losses[epoch * steps:(epoch + 1) * steps]) / steps, rel=1e-6)


def test_evaluate_against_one_pass_oracle(mnist):
    # batches of 300 over 1,000 examples (the last one short): error and loss as over the whole set at once
    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=32, depth=1).eval()
    x, y = mnist.test_x[:1000], mnist.test_y[:1000]
    error, loss = evaluate(model, x, y, batch_size=300)
    with torch.no_grad():
        out = model(x)
    assert error == (out.argmax(1) != y).sum().item() / len(y)
    assert loss == pytest.approx(square_hinge_loss(out, y).item(), rel=1e-6)
    # samples > 1: the average of that many forward passes with fresh binary weights, in draw order
    sto = create_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=32, depth=1,
                       binarization="stochastic").eval()
    set_stochastic_eval(sto, "sample")
    set_generator(sto, torch.Generator().manual_seed(1))
    error, loss = evaluate(sto, x, y, batch_size=1000, samples=3)
    set_generator(sto, torch.Generator().manual_seed(1))
    with torch.no_grad():
        draws = [sto(x) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1])
    mean = sum(draws) / 3
    assert error == (mean.argmax(1) != y).sum().item() / len(y)
    assert loss == pytest.approx(square_hinge_loss(mean, y).item(), rel=1e-6)


def test_stochastic_eval_modes(tmp_path, mnist):
    fit(_small(binarization="stochastic", epochs=1), tmp_path / "r", progress=False, log=lambda *a: None, data=mnist)
    model, _ = load_run(tmp_path / "r")
    x = mnist.test_x[:500]
    real = model(x)
    first = next(binary_layers(model))
    first.stochastic_eval = "sample"
    first.generator = torch.Generator().manual_seed(0)
    sampled = model(x)
    assert not torch.allclose(real, sampled)  # sampled binary weights differ from the real ones
    first.stochastic_eval = "real"
    assert torch.equal(model(x), real)


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="lr_start must be a positive number"):
        recipe_config("mnist-float", lr_start=-1.0)
    for name in ("H", "lr_start", "lr_end"):  # JSON's true is a bool, not the number 1 (a hand-edited config.json)
        with pytest.raises(ConfigError, match=f"{name} must be a positive number, got True"):
            recipe_config("mnist-float", **{name: True})
    with pytest.raises(ConfigError, match="unknown recipe 'mnist'; known recipes: .*mnist-deterministic"):
        recipe_config("mnist")
    with pytest.raises(ConfigError, match="lr_end .* must not exceed lr_start"):
        recipe_config("mnist-float", lr_start=1e-4, lr_end=1e-3)
    with pytest.raises(ConfigError, match="binarization must be one of"):
        recipe_config("mnist-float", binarization="sign")
    with pytest.raises(ConfigError, match="unknown configuration keys: colour"):
        TrainConfig.from_dict({"colour": 1})


def test_batch_larger_than_data_is_refused(tmp_path, mnist):
    with pytest.raises(ConfigError, match="larger than the 50 training examples"):
        fit(_small(train_subset=50, batch_size=100), tmp_path / "r", progress=False, log=lambda *a: None, data=mnist)


@pytest.mark.slow
def test_one_epoch_of_the_paper_network_on_real_mnist(tmp_path, mnist):
    """The full-width deterministic net, one epoch on all 50,000 images: test error below 5%."""
    config = recipe_config("mnist-deterministic", epochs=1, device="cpu")
    assert config.model_kwargs["hidden"] == 1024 and config.model_kwargs["depth"] == 3
    summary = fit(config, tmp_path / "run", progress=False, log=lambda *a: None, data=mnist)
    assert summary["test_error"] < 0.05


def test_options_reach_the_model_the_optimizer_and_the_evaluation(tmp_path, mnist, monkeypatch):
    """H, the straight-through variant, the learning-rate scale, the schedule, the run's binarization
    generator and the number of evaluation samples each reach what uses them: checked where they act (the
    model's layers, the optimizer's groups in the checkpoint, the generator the sampler is given, the calls
    to evaluate), not through the configuration they were read from."""
    from binaryconnect import binarize, train
    from binaryconnect.checkpoint import CHECKPOINT_NAME, load_checkpoint

    generators, samples = [], []
    sampler, training_sampler, evaluator = binarize.binarize_stochastic, binarize._binarize_cpu, train.evaluate

    def spy_sampler(w, H=1.0, generator=None):
        generators.append(generator)
        return sampler(w, H, generator)

    def spy_training_sampler(w, mode, H, generator):  # the training forward's on the CPU
        generators.append(generator)
        return training_sampler(w, mode, H, generator)

    def spy_evaluate(model, x, y, batch_size=1000, samples_=1, **kw):
        samples.append(kw.get("samples", samples_))
        return evaluator(model, x, y, batch_size, kw.get("samples", samples_))

    monkeypatch.setattr(binarize, "binarize_stochastic", spy_sampler)
    monkeypatch.setattr(binarize, "_binarize_cpu", spy_training_sampler)
    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    config = _small(binarization="stochastic", H=0.5, ste="clipped", lr_scale="none", stochastic_eval="sample",
                    eval_samples=3, epochs=2, seed=7)
    fit(config, tmp_path / "run", progress=False, log=lambda *a: None, data=mnist)

    model, _ = load_run(tmp_path / "run")
    layers = [layer for layer in binary_layers(model) if layer.is_binary]
    assert layers and all((layer.H, layer.ste, layer.stochastic_eval) == (0.5, "clipped", "sample") for layer in layers)
    assert all(layer.weight.abs().max() <= 0.5 for layer in layers)  # clipped to this H, not to 1
    _, state = load_checkpoint(tmp_path / "run" / CHECKPOINT_NAME)
    groups = state["optimizer"]["param_groups"]
    assert all(g["lr_scale"] == 1.0 for g in groups)  # lr_scale "none"
    assert all(g["lr"] == pytest.approx(1e-3) for g in groups)  # the last epoch's rate reached the optimizer
    training_draws = [g for g in generators if g is not None]
    assert len(training_draws) >= 2 * (2000 // 100) * len(layers)  # every training step of every layer
    assert all(g.initial_seed() == 7 + 1 for g in training_draws)  # the run's binarization generator
    assert samples == [3] * 4  # validation and test, 2 epochs


def test_a_registered_network_of_ones_own_trains_reloads_and_exports(tmp_path, mnist, monkeypatch):
    """A network the user builds (a float nn.Sequential made BinaryConnect by ``binarize_modules_``), registered
    as a model: ``fit`` trains it with everything the recipes get (the scales, the clipping, best-validation
    selection), ``load_run`` rebuilds it from the run directory, and it exports to the packed format."""
    import math

    from torch import nn

    from binaryconnect.export import PackedModel
    from binaryconnect.export.convert import export_run
    from binaryconnect.layers import BinaryLinear, binarize_modules_
    from binaryconnect.models import _REGISTRY

    def my_net(input_shape, num_classes, binarization, H, ste, stochastic_eval, hidden=64):
        net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden, bias=False),
                            nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes, bias=False),
                            nn.BatchNorm1d(num_classes))
        return binarize_modules_(net, binarization, H=H, ste=ste, stochastic_eval=stochastic_eval, weights="reset")

    monkeypatch.setitem(_REGISTRY, "my_net", my_net)
    run = tmp_path / "run"
    config = recipe_config("mnist-deterministic", model="my_net", model_kwargs={"hidden": 64}, train_subset=2000,
                           epochs=2, lr_start=3e-3, lr_end=1e-3, device="cpu")
    assert config.model_kwargs == {"hidden": 64}  # not the recipe's MLP options (depth, bn_momentum)
    assert config.recipe is None and config.lr_start == 3e-3  # not that recipe's network: named by its model
    assert recipe_config("mnist-deterministic", model="mlp", model_kwargs={"hidden": 8}).model_kwargs == {
        "hidden": 8, "depth": 3, "bn_momentum": 0.15}  # the recipe's own model: merged
    lines = []
    summary = fit(config, run, data=mnist, log=lines.append)
    assert lines[0].startswith("training my_net (deterministic) on mnist")
    from binaryconnect.report import group_runs, read_run

    assert [g.label for g in group_runs([read_run(run)])] == ["my_net deterministic"]
    assert summary["test_error"] < 0.25  # 16.4-16.6% here (seeds 0-2): 64 binary units, 2 epochs, 2,000 images
    model, config = load_run(run)
    assert config.model == "my_net" and [type(m) for m in binary_layers(model)] == [BinaryLinear, BinaryLinear]
    assert all(m.weight.abs().max() <= 1.0 for m in binary_layers(model))  # clipped by the training loop
    error, _ = evaluate(model, mnist.test_x, mnist.test_y)
    assert error == summary["test_error"]
    packed = PackedModel(export_run(run), engine="torch")
    with torch.no_grad():
        assert torch.equal(packed(mnist.test_x[:500]).argmax(1), model(mnist.test_x[:500]).argmax(1))


def test_each_epoch_line_says_about_how_long_the_rest_takes(tmp_path, mnist, monkeypatch):
    """After each epoch but the last: the epochs left at the run's pace (the lower median of its recent epochs
    but the first, which pays for the warm-up; after the first, its own time); from a minute to go (here
    from no time at all: these epochs are short)."""
    monkeypatch.setattr(train, "TIME_TO_GO_FROM", 0.0)
    lines = []
    fit(_small(epochs=4), tmp_path / "run", progress=False, log=lines.append, data=mnist)
    epochs = [line for line in lines if line.startswith("epoch ")]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) == 4 and "to go" not in epochs[-1]
    paces = [rows[0]["seconds"], rows[1]["seconds"], min(rows[1]["seconds"], rows[2]["seconds"])]
    for line, left, pace in zip(epochs[:3], (3, 2, 1), paces, strict=True):
        assert line.endswith(f"s, about {train._span(left * pace)} to go)"), line


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (89.4, "89 s"), (89.6, "1 min"), (150, "2 min"),
                                           (5369, "89 min"), (5399, "1.5 h"), (5400, "1.5 h"),
                                           (47 * 3600, "47.0 h"), (172_790, "2.0 days"), (553_000, "6.4 days")])
def test_spans_are_said_as_people_say_them(seconds, text):
    assert train._span(seconds) == text


def test_a_short_time_to_go_goes_unsaid():
    history = [{"seconds": 20.0}, {"seconds": 9.0}, {"seconds": 11.0}]
    assert train._time_to_go(7, history, []) == ", about 63 s to go"  # 7 x the lower median of 9 and 11
    assert train._time_to_go(6, history, []) == ""  # 54 s
    assert train._time_to_go(3, history[:1], []) == ", about 60 s to go"  # the first epoch's own time
    assert train._time_to_go(6, history, [{"epoch": 1, "step": 0}]) == ", about 66 s to go"  # a resumed
    # process's first epoch (1) is left out of the pace; one it began in its middle, when it is all there is:
    assert train._time_to_go(240, history[:2], [{"epoch": 1, "step": 30}]) == ""  # (its 9 s: part of an epoch)
    assert train._time_to_go(240, history[:2], [{"epoch": 1, "step": 0}]) == ", about 36 min to go"
    assert train._time_to_go(0, history, []) == ""
