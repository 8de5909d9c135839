"""The paper's MNIST MLP and the model registry."""

import pytest
import torch
from torch import nn

from binaryconnect.layers import BinaryLinear
from binaryconnect.models import create_model, list_models


def test_paper_mlp_shape_and_parameter_count():
    net = create_model("mlp")
    linears = [m for m in net.modules() if isinstance(m, BinaryLinear)]
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1024), (1024, 1024), (1024, 1024),
                                                                 (1024, 10)]
    assert all(m.bias is None and m.binarization == "deterministic" for m in linears)
    assert len(bns) == 4 and all(b.eps == 1e-4 and b.momentum == 0.15 for b in bns)
    weights = 784 * 1024 + 2 * 1024 * 1024 + 1024 * 10
    bn = 2 * (3 * 1024 + 10)
    assert sum(p.numel() for p in net.parameters()) == weights + bn
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 3  # none after the output layer
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_is_configurable():
    net = create_model("mlp", hidden=64, depth=1, binarization="stochastic", binarize_first=False,
                       binarize_last=True)
    linears = [m for m in net.modules() if isinstance(m, BinaryLinear)]
    assert [m.binarization for m in linears] == ["none", "stochastic"]
    assert net(torch.randn(3, 784)).shape == (3, 10)



@pytest.mark.parametrize("name, kwargs", [("mlp", {"hidden": 16, "depth": 2}),
                                          ("convnet", {"channels": [4, 8, 8], "hidden": 16})])
def test_binary_options_reach_every_binarized_layer(name, kwargs):
    """H, the straight-through variant and the stochastic evaluation mode given to a model reach each of
    its binarized layers (first and last included), and their latent weights start in [-H, H]."""
    from binaryconnect.layers import binary_layers

    net = create_model(name, binarization="stochastic", H=0.5, ste="clipped", stochastic_eval="sample", **kwargs)
    layers = list(binary_layers(net))
    assert len(layers) == {"mlp": 3, "convnet": 9}[name]  # mlp: 2 hidden + output; convnet: 6 conv + 2 fc + output
    for layer in layers:
        assert (layer.binarization, layer.H, layer.ste, layer.stochastic_eval) == ("stochastic", 0.5, "clipped",
                                                                                    "sample")
        assert layer.weight.abs().max() <= 0.5

def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="known models: .*mlp"):
        create_model("resnet")
    assert "mlp" in list_models()


def test_impossible_shapes_are_rejected():
    with pytest.raises(ValueError, match="impossible MLP shape"):
        create_model("mlp", hidden=0)
    with pytest.raises(ValueError, match="bad options for model 'mlp': no option 'widht'; its options: "):
        create_model("mlp", widht=3)
    with pytest.raises(ValueError, match="bad options for model 'convnet': 'int' object is not iterable"):
        create_model("convnet", channels=5)  # a TypeError inside, from the options: still "bad options"


def test_a_registered_factorys_own_errors_are_not_called_bad_options(monkeypatch):
    """Options a factory does not take are "bad options"; an error inside a factory with a plain signature is
    its own, with its traceback (a TypeError in the user's code is not the user's options)."""
    from binaryconnect.models import _REGISTRY

    def buggy(input_shape, num_classes, hidden=8):
        return torch.zeros(3) + "oops"

    monkeypatch.setitem(_REGISTRY, "buggy", buggy)
    with pytest.raises(ValueError, match=r"bad options for model 'buggy': no option 'depth'; its options: "
                                         r"input_shape, num_classes, hidden$"):
        create_model("buggy", input_shape=(4,), num_classes=2, depth=3)
    with pytest.raises(TypeError, match="unsupported operand type"):
        create_model("buggy", input_shape=(4,), num_classes=2)
