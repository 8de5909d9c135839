"""The paper's convnets: layer sequence, shapes and parameter counts against the architecture
(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-(2x1024FC)-10 (SVHN: half the conv channels), and the speed
options (channels-last, bf16 autocast, torch.compile) against the eager float32 forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from binaryconnect.config import RECIPES, recipe_config
from binaryconnect.errors import ConfigError
from binaryconnect.layers import BinaryConv2d, BinaryLinear, binary_layers, set_generator
from binaryconnect.models import create_model
from binaryconnect.models.convnet import BinaryConvNet
from binaryconnect.speed import training_forward
from binaryconnect.train import build_model


def paper_param_count(channels, hidden=1024, num_classes=10, in_ch=3, size=32):
    """Parameters from the architecture alone: conv weights 3x3 (no bias), dense weights (no bias),
    batch norm gamma and beta after every one of them."""
    convs, c = [], in_ch
    for ch in channels:
        convs += [(c, ch), (ch, ch)]
        c = ch
    flat = channels[-1] * (size // 8) ** 2
    dense = [(flat, hidden), (hidden, hidden), (hidden, num_classes)]
    weights = sum(9 * a * b for a, b in convs) + sum(a * b for a, b in dense)
    bn = 2 * (sum(b for _, b in convs) + sum(b for _, b in dense))
    return weights + bn


@pytest.mark.parametrize("channels, expected", [((128, 256, 512), 14_029_716), ((64, 128, 256), 6_403_540)])
def test_parameter_counts(channels, expected):
    model = create_model("convnet", channels=channels)
    assert paper_param_count(channels) == expected
    assert sum(p.numel() for p in model.parameters()) == expected


def test_cifar10_layer_sequence_and_shapes():
    model = create_model("convnet", binarization="stochastic")
    kinds = [type(m).__name__ for m in model.features]
    stage = ["BinaryConv2d", "BatchNorm2d", "ReLU", "BinaryConv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    assert kinds == stage * 3  # BN after the pooling, as in the original cifar10.py
    convs = [m for m in model.features if isinstance(m, BinaryConv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 128), (128, 128), (128, 256), (256, 256),
                                                                (256, 512), (512, 512)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    dense = [m for m in model.classifier if isinstance(m, BinaryLinear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(8192, 1024), (1024, 1024), (1024, 10)]
    assert all(d.bias is None for d in dense)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 9 and all(b.eps == 1e-4 and b.momentum == 0.1 and b.affine for b in bns)
    assert isinstance(model.classifier[-1], nn.BatchNorm1d)  # the output is batch-normalised, no ReLU
    assert len(list(binary_layers(model))) == 9
    assert all(layer.binarization == "stochastic" for layer in binary_layers(model))
    x = torch.randn(2, 3, 32, 32)
    shapes = []
    h = x
    for m in model.features:
        h = m(h)
        if isinstance(m, nn.MaxPool2d):
            shapes.append(tuple(h.shape))
    assert shapes == [(2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]
    assert model(x).shape == (2, 10)


def test_bn_before_pool_option():
    model = BinaryConvNet(channels=(8, 8, 8), hidden=16, bn_after_pool=False)
    kinds = [type(m).__name__ for m in model.features][:7]
    assert kinds == ["BinaryConv2d", "BatchNorm2d", "ReLU", "BinaryConv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]


def test_training_forward_uses_binary_weights():
    torch.manual_seed(0)
    model = BinaryConvNet(channels=(4, 8, 8), hidden=16, binarization="deterministic").train()
    conv = model.features[0]
    x = torch.randn(3, 3, 32, 32)
    expected = F.conv2d(x, torch.where(conv.weight >= 0, 1.0, -1.0), padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_other_input_shapes_and_errors():
    model = create_model("convnet", input_shape=(1, 16, 24), num_classes=5, channels=(4, 4, 4), hidden=8)
    assert model(torch.randn(2, 1, 16, 24)).shape == (2, 5)
    with pytest.raises(ValueError, match="divisible"):
        create_model("convnet", input_shape=(3, 28, 28))
    with pytest.raises(ValueError, match="C, H, W"):
        create_model("convnet", input_shape=(784,))
    config = recipe_config("cifar10-deterministic")
    with pytest.raises(ConfigError, match="divisible"):
        build_model(config, (1, 28, 28), 10)


def test_recipes_match_the_paper():
    for b in ("float", "deterministic", "stochastic"):
        c = recipe_config(f"cifar10-{b}")
        assert (c.dataset, c.model, c.epochs, c.batch_size, c.lr_start, c.lr_end, c.val_size) == (
            "cifar10", "convnet", 500, 50, 3e-3, 2e-6, 5000)
        assert c.binarization == ("none" if b == "float" else b)
        assert c.dataset_kwargs == {"preprocess": "gcn-zca"} and c.model_kwargs["channels"] == [128, 256, 512]
        s = recipe_config(f"svhn-{b}")
        assert (s.dataset, s.epochs, s.batch_size, s.lr_start, s.lr_end) == ("svhn", 200, 50, 1e-2, 3e-6)
        assert s.dataset_kwargs == {"preprocess": "gcn-lcn", "extra": True}
        assert s.model_kwargs["channels"] == [64, 128, 256]
        assert recipe_config(f"cifar10-gcn-{b}").dataset_kwargs == {"preprocess": "gcn"}
        assert RECIPES[f"cifar10-augmented-{b}"]["dataset_kwargs"]["augment"] == "crop-flip"
    with pytest.raises(ConfigError, match="amp"):
        recipe_config("cifar10-float", amp="fp8")


def test_compile_mode_is_validated_and_implied_by_the_command_line():
    from binaryconnect.cli import _data_and_speed_options, build_parser

    assert recipe_config("mnist-float", compile=True, compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    assert recipe_config("mnist-float").compile_mode == "default"
    with pytest.raises(ConfigError, match="compile_mode must be one of default, reduce-overhead"):
        recipe_config("mnist-float", compile=True, compile_mode="fast")
    with pytest.raises(ConfigError, match="needs compile=true"):
        recipe_config("mnist-float", compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        training_forward(nn.Linear(2, 2), compile=True, compile_mode="fast")
    parse = build_parser().parse_args
    options = _data_and_speed_options(parse(["train", "mnist-float", "--compile-mode", "reduce-overhead"]))
    assert (options["compile"], options["compile_mode"]) == (True, "reduce-overhead")
    options = _data_and_speed_options(parse(["train", "mnist-float"]))
    assert (options["compile"], options["compile_mode"]) == (None, None)  # the recipe's values stay


@pytest.mark.slow
def test_compile_mode_reduce_overhead_matches_eager():
    """``reduce-overhead`` (CUDA graphs on a GPU; on the CPU, Inductor's default code) gives the eager
    outputs and latent-weight gradients, over several steps (each call marks a new graph step)."""
    torch.manual_seed(0)
    ref = create_model("mlp", input_shape=(1, 4, 4), num_classes=10, hidden=16, depth=1)
    fast = create_model("mlp", input_shape=(1, 4, 4), num_classes=10, hidden=16, depth=1)
    fast.load_state_dict(ref.state_dict())
    forward = training_forward(fast, compile=True, compile_mode="reduce-overhead")
    for step in range(3):
        x = torch.randn(8, 1, 4, 4)
        out, expected = forward(x), ref(x)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        out.square().mean().backward()
        expected.square().mean().backward()
        for (name, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=f"step {step}: {name}")


def _small(binarization="deterministic", seed=0):
    torch.manual_seed(seed)
    return BinaryConvNet(channels=(4, 8, 8), hidden=16, binarization=binarization)


def test_channels_last_gives_the_same_function():
    x = torch.randn(4, 3, 32, 32)
    ref, fast = _small(), _small()
    fast_forward = training_forward(fast, channels_last=True)
    assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast_forward(x), ref(x), rtol=1e-4, atol=1e-4)
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_bf16_autocast_runs_convolutions_in_bf16():
    """Convolutions, dense layers and (on bf16 inputs) batch norm output bfloat16; parameters, running
    statistics and the returned output stay float32; the output stays close to float32's (measured:
    4-6% relative RMS over 5 seeds for this 9-layer net; bound 15%)."""
    x = torch.randn(16, 3, 32, 32)
    ref, fast = _small(), _small()
    dtypes = {}
    for m in fast.modules():
        if isinstance(m, (BinaryConv2d, BinaryLinear, nn.BatchNorm2d)):
            m.register_forward_hook(lambda mod, i, o: dtypes.setdefault(type(mod).__name__, set()).add(o.dtype))
    out = training_forward(fast, amp="bf16")(x)
    expected = ref(x)
    assert dtypes == {"BinaryConv2d": {torch.bfloat16}, "BinaryLinear": {torch.bfloat16},
                      "BatchNorm2d": {torch.bfloat16}}
    assert fast.features[1].running_mean.dtype == torch.float32
    assert out.dtype == torch.float32
    assert (out - expected).square().mean().sqrt() < 0.15 * expected.square().mean().sqrt()
    assert fast.features[0].weight.dtype == torch.float32  # latent weights stay float32
    with pytest.raises(ConfigError):
        training_forward(fast, amp="fp16")


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    """torch.compile (CPU, Inductor) of the deterministic net: same outputs and latent-weight gradients;
    the stochastic net compiles into one graph (no break at the binarization), draws fresh binary
    weights from the global generator and passes gradients to every latent weight."""
    import torch._dynamo

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    ref, fast = _small(), _small()
    compiled = training_forward(fast, compile=True)
    out, expected = compiled(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)

    sto = _small("stochastic")
    set_generator(sto, torch.Generator().manual_seed(1))  # as fit() does
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(training_forward(sto, compile=False))(x)
    assert explanation.graph_break_count > 0  # eager layers keep their dedicated generator: Dynamo breaks
    forward = training_forward(sto, compile=True)  # detaches the generator: one graph
    torch._dynamo.reset()
    assert torch._dynamo.explain(forward._torchdynamo_orig_callable)(x).graph_break_count == 0
    torch.manual_seed(5)
    first = forward(x)
    torch.manual_seed(5)
    again = forward(x)
    torch.manual_seed(6)
    other = forward(x)
    torch.testing.assert_close(first, again)  # drawn from the global generator, reproducible from its seed
    assert not torch.allclose(first, other)  # and drawn anew on each call
    F.cross_entropy(first, y).backward()
    for layer in binary_layers(sto):
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_fit_with_channels_last_and_bf16(tmp_path):
    """fit() trains through training_forward: channels-last gives the float32 run's losses (same function,
    another memory layout), bf16 autocast runs and stays close; both write their options to config.json."""
    import json

    from binaryconnect.data import Splits
    from binaryconnect.train import fit

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 3, 32, 32, generator=g), torch.randint(0, 10, (120,), generator=g)
    data = Splits(x[:80], y[:80], x[80:100], y[80:100], x[100:], y[100:], num_classes=10)
    losses = {}
    for name, options in {"ref": {}, "cl": {"channels_last": True}, "bf16": {"amp": "bf16"}}.items():
        config = recipe_config("cifar10-deterministic", model_kwargs={"channels": [4, 8, 8], "hidden": 16},
                               epochs=2, batch_size=20, device="cpu", **options)
        fit(config, tmp_path / name, progress=False, log=lambda *a, **k: None, data=data)
        records = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(r)["train_loss"] for r in records]
        saved = json.loads((tmp_path / name / "config.json").read_text())["config"]
        assert {k: saved[k] for k in ("amp", "channels_last", "compile")} == {
            "amp": options.get("amp", "none"), "channels_last": options.get("channels_last", False), "compile": False}
    assert losses["cl"][0] == pytest.approx(losses["ref"][0], rel=1e-4)
    assert losses["bf16"][0] == pytest.approx(losses["ref"][0], rel=0.05)


#: The paper's settings (and this project's MNIST epochs), written out here rather than read from RECIPES:
#: dataset, model options, dataset options, epochs, batch size, Adam's first and last learning rates, and
#: the training examples held out for validation (CIFAR-10: 45,000 / 5,000; SVHN: README's 6,000).
PAPER = {
    "mnist": ("mnist", "mlp", {"hidden": 1024, "depth": 3, "bn_momentum": 0.15}, {}, 250, 100, 1e-3, 3e-6, 10_000),
    "cifar10": ("cifar10", "convnet", {"channels": [128, 256, 512], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
                {"preprocess": "gcn-zca"}, 500, 50, 3e-3, 2e-6, 5_000),
    "cifar10-gcn": ("cifar10", "convnet",
                    {"channels": [128, 256, 512], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
                    {"preprocess": "gcn"}, 500, 50, 3e-3, 2e-6, 5_000),
    "cifar10-augmented": ("cifar10", "convnet",
                          {"channels": [128, 256, 512], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
                          {"preprocess": "gcn", "augment": "crop-flip"}, 500, 50, 3e-3, 2e-6, 5_000),
    "svhn": ("svhn", "convnet", {"channels": [64, 128, 256], "hidden": 1024, "fc_depth": 2, "bn_momentum": 0.1},
             {"preprocess": "gcn-lcn", "extra": True}, 200, 50, 1e-2, 3e-6, 6_000),
}


@pytest.mark.parametrize("family", sorted(PAPER))
@pytest.mark.parametrize("binarization", ["float", "deterministic", "stochastic"])
def test_every_recipe_is_the_papers_setting(family, binarization):
    """Each of the 15 recipes against the paper's table above, option by option (model options whole:
    a batch-norm momentum or a width changed shows), with the paper's defaults for what it leaves alone."""
    c = recipe_config(f"{family}-{binarization}")
    assert (c.dataset, c.model, c.model_kwargs, c.dataset_kwargs, c.epochs, c.batch_size, c.lr_start, c.lr_end,
            c.val_size) == PAPER[family]
    assert (c.binarization, c.recipe) == ("none" if binarization == "float" else binarization,
                                          f"{family}-{binarization}")
    assert (c.H, c.ste, c.stochastic_eval, c.lr_scale) == (1.0, "identity", "real", "glorot")
    assert sorted(RECIPES) == sorted(f"{f}-{b}" for f in PAPER for b in ("float", "deterministic", "stochastic"))


@pytest.mark.parametrize("recipe, input_shape, dense, convs, momentum", [
    ("mnist-deterministic", (1, 28, 28), [(784, 1024), (1024, 1024), (1024, 1024), (1024, 10)], [], 0.15),
    ("cifar10-deterministic", (3, 32, 32), [(8192, 1024), (1024, 1024), (1024, 10)],
     [(3, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)], 0.1),
    ("svhn-deterministic", (3, 32, 32), [(4096, 1024), (1024, 1024), (1024, 10)],
     [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256)], 0.1),
])
def test_recipes_build_the_papers_networks(recipe, input_shape, dense, convs, momentum):
    """The network a recipe builds: the paper's layer sizes, and batch norm with epsilon 1e-4 and momentum
    0.15 (MNIST) or 0.1 (CIFAR-10, SVHN) after every binary layer."""
    model = build_model(recipe_config(recipe), input_shape, 10)
    assert [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, BinaryLinear)] == dense
    assert [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, BinaryConv2d)] == convs
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == len(dense) + len(convs)
    assert all(b.eps == 1e-4 and b.momentum == momentum for b in bns)


def test_channels_last_also_converts_the_input_batches():
    """With channels_last, the first convolution receives its NCHW batch stored NHWC (same values)."""
    model = _small()
    seen = []
    model.features[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 32, 32)
    training_forward(model, channels_last=True)(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(seen[0], x)


@pytest.mark.parametrize("mode, graph_steps", [("default", 0), ("reduce-overhead", 2), ("max-autotune", 2),
                                               ("max-autotune-no-cudagraphs", 0)])
def test_compile_options_reach_torch_compile(monkeypatch, mode, graph_steps):
    """torch.compile gets the mode asked for (None for "default", its own default); with the modes that
    record CUDA graphs each call starts a new graph step; compiling detaches stochastic layers from their
    dedicated generator (Dynamo cannot trace a torch.Generator). torch.compile is replaced by a recorder."""
    modes, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model = _small("stochastic")
    set_generator(model, torch.Generator().manual_seed(0))
    forward = training_forward(model, compile=True, compile_mode=mode)
    x = torch.randn(2, 3, 32, 32)
    forward(x)
    forward(x)
    assert modes == [None if mode == "default" else mode] and len(steps) == graph_steps
    assert all(layer.generator is None for layer in binary_layers(model))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_hint_only_for_a_float32_convnet_on_a_cpu_with_native_bf16(monkeypatch, native):
    from binaryconnect import speed

    monkeypatch.setattr(speed, "cpu_computes_bf16", lambda: native)
    convnet = create_model("convnet", channels=[4, 8, 8], hidden=16)
    mlp = create_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=16, depth=1)
    cpu = torch.device("cpu")
    hint = speed.cpu_bf16_hint(convnet, cpu, "none")
    if native:
        assert hint.startswith("hint: this CPU computes bfloat16 natively: --amp bf16 --channels-last")
    else:
        assert hint is None
    assert speed.cpu_bf16_hint(convnet, cpu, "bf16") is None  # already asked for
    assert speed.cpu_bf16_hint(mlp, cpu, "none") is None  # no convolution
    assert speed.cpu_bf16_hint(convnet, torch.device("cuda"), "none") is None  # not a CPU


@pytest.mark.parametrize("machine, avx512_bf16, amx, expected", [
    ("x86_64", True, False, True),  # AMD Zen 4, Cooper Lake
    ("x86_64", False, True, True),  # AMX
    ("x86_64", False, False, False),  # AVX-512 alone (Skylake to Ice Lake): oneDNN emulates bf16
    ("AMD64", True, False, True),  # Windows' name
    ("aarch64", True, True, False),  # not measured on Arm
])
def test_cpu_computes_bf16_asks_for_the_bf16_instructions(monkeypatch, machine, avx512_bf16, amx, expected):
    from binaryconnect import speed

    monkeypatch.setattr(speed.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)  # not asked
    assert speed.cpu_computes_bf16() is expected


def test_cpu_computes_bf16_is_false_when_torch_has_no_probe(monkeypatch):
    from binaryconnect import speed

    monkeypatch.setattr(speed.platform, "machine", lambda: "x86_64")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert speed.cpu_computes_bf16() is False


@pytest.mark.parametrize("machine, native, device, amp, warned", [
    ("x86_64", False, "cpu", "bf16", True),  # AVX2 or AVX-512 alone: emulated
    ("AMD64", False, "cpu", "bf16", True),
    ("x86_64", True, "cpu", "bf16", False),  # AVX512-BF16 or AMX
    ("x86_64", False, "cpu", "none", False),  # float32
    ("x86_64", False, "cuda", "bf16", False),  # not a CPU
    ("aarch64", False, "cpu", "bf16", False),  # not measured on Arm
])
def test_cpu_bf16_emulated_warning_only_for_bf16_on_an_x86_cpu_without_bf16_instructions(
        monkeypatch, machine, native, device, amp, warned):
    from binaryconnect import speed

    monkeypatch.setattr(speed.platform, "machine", lambda: machine)
    monkeypatch.setattr(speed, "cpu_computes_bf16", lambda: native)
    warning = speed.cpu_bf16_emulated_warning(torch.device(device), amp)
    if warned:
        assert warning.startswith("--amp bf16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX)")
        assert "leave out --amp bf16" in warning
    else:
        assert warning is None


@pytest.mark.parametrize("native", [True, False])
def test_fit_warns_once_when_bf16_is_emulated(tmp_path, monkeypatch, native):
    import warnings

    from binaryconnect import speed
    from binaryconnect.data import Splits
    from binaryconnect.train import fit

    monkeypatch.setattr(speed.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(speed, "cpu_computes_bf16", lambda: native)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, 32, 32, generator=g), torch.randint(0, 10, (30,), generator=g)
    data = Splits(x[:20], y[:20], x[20:25], y[20:25], x[25:], y[25:], num_classes=10)
    config = recipe_config("cifar10-deterministic", model_kwargs={"channels": [2, 2, 2], "hidden": 8},
                           epochs=1, batch_size=10, device="cpu", amp="bf16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(config, tmp_path / "run", progress=False, log=lambda *a, **k: None, data=data)
    emulated = [w for w in caught if "bfloat16 is emulated here" in str(w.message)]
    assert len(emulated) == (0 if native else 1)
    assert (tmp_path / "run" / "summary.json").exists()  # a warning, not a refusal: the run trains


@pytest.mark.parametrize("amp, expect_hint", [("none", True), ("bf16", False)])
def test_fit_logs_the_cpu_bf16_hint_once(tmp_path, monkeypatch, amp, expect_hint):
    from binaryconnect import speed
    from binaryconnect.data import Splits
    from binaryconnect.train import fit

    monkeypatch.setattr(speed, "cpu_computes_bf16", lambda: True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 3, 32, 32, generator=g), torch.randint(0, 10, (60,), generator=g)
    data = Splits(x[:40], y[:40], x[40:50], y[40:50], x[50:], y[50:], num_classes=10)
    config = recipe_config("cifar10-deterministic", model_kwargs={"channels": [4, 8, 8], "hidden": 16},
                           epochs=1, batch_size=20, device="cpu", amp=amp)
    lines = []
    fit(config, tmp_path / "run", progress=False, log=lambda *a, **k: lines.append(" ".join(map(str, a))), data=data)
    hints = [line for line in lines if line.startswith("hint: this CPU computes bfloat16")]
    assert len(hints) == (1 if expect_hint else 0)
