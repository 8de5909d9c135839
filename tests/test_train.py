"""fit(): the run directory, best-validation selection, evaluation modes, and a real MNIST epoch."""

import json

import pytest
import torch

from binaryconnect.config import TrainConfig, recipe_config
from binaryconnect.errors import ConfigError
from binaryconnect.layers import binary_layers
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
    assert summary["test_error"] < 0.5  # it learned something from 2000 images

    # the saved model is the best one: evaluating it reproduces the recorded errors exactly
    model, loaded = load_run(run)
    assert loaded == config
    val_error, _ = evaluate(model, mnist.val_x, mnist.val_y)
    test_error, _ = evaluate(model, mnist.test_x, mnist.test_y)
    assert (val_error, test_error) == (best["val_error"], best["test_error"])
    for layer in binary_layers(model):  # latent weights stayed in [-H, H]
        if layer.is_binary:
            assert layer.weight.abs().max() <= layer.H


def test_same_seed_same_weights_different_seed_different(tmp_path, mnist):
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        fit(_small(binarization="stochastic", epochs=1, seed=seed), tmp_path / str(i), progress=False,
            log=lambda *a: None, data=mnist)
        runs.append(load_run(tmp_path / str(i))[0].state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not torch.equal(runs[0]["layers.1.weight"], runs[2]["layers.1.weight"])


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
