"""Export of PyTorch models (batch-norm folding, packing) and the engines against the eval-mode model.

Oracles: the eval-mode training model in float64 (``model.double()``) and in float32. Tolerance on
logits: ``|packed - float64| <= 2e-5 * (1 + max |float64|)`` (float32 rounding of sums of up to ~8k
terms, amplified by the batch-norm scales, is about 1e-6 relative here); the float32 PyTorch model
itself is held to the same bound: the packed engines must be as accurate as float32 PyTorch.
"""

import copy
import math

import pytest
import torch
from torch import nn

from binaryconnect.export import ExportError, PackedModel, export_model, load_packed, summarize
from binaryconnect.export.convert import recalibrate_batch_norm
from binaryconnect.export.pack import packed_size
from binaryconnect.layers import BinaryConv2d, BinaryLinear, binarize_modules_
from binaryconnect.models import create_model, list_models

ENGINES = ("native", "torch")


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor, seed: int = 0) -> nn.Module:
    """Give every batch norm the running statistics of ``x`` and random affine parameters (some gammas
    negative), so that the folded scales are realistic and of both signs; return the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration pass
        if not bn.affine:
            continue
        bn.weight.copy_(torch.randn(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
    model.train()
    model(x)
    return model.eval()


def _tolerance(ref64: torch.Tensor) -> float:
    return 2e-5 * (1 + ref64.abs().max().item())


def _check_against_model(model: nn.Module, net, x: torch.Tensor, engines=ENGINES) -> dict:
    ref32 = model(x).detach()
    ref64 = copy.deepcopy(model).double()(x.double()).detach()
    tol = _tolerance(ref64)
    assert (ref32.double() - ref64).abs().max().item() <= tol  # float32 PyTorch meets the bound
    outs = {}
    for engine in engines:
        out = outs[engine] = PackedModel(net, engine=engine)(x)
        assert out.shape == ref32.shape and out.dtype == torch.float32
        err = (out.double() - ref64).abs().max().item()
        assert err <= tol, f"{engine}: error {err:.3g} > {tol:.3g}"
        assert torch.equal(out.argmax(1), ref64.argmax(1)), engine
    return outs


def test_paper_mlp_matches_the_eval_model():
    model = create_model("mlp")  # 784-1024-1024-1024-10, deterministic
    calibrate(model, torch.rand(512, 1, 28, 28) * 2 - 1)
    net = export_model(model, (1, 28, 28))
    assert [la["type"] for la in net.layers] == ["flatten"] + ["linear", "relu"] * 3 + ["linear"]
    for batch in (1, 3, 64):
        _check_against_model(model, net, torch.rand(batch, 1, 28, 28) * 2 - 1)


def _small_convnet(bn_after_pool: bool = True) -> nn.Sequential:
    """The CIFAR convnet's layout at small width: pairs of 3x3 binary convolutions, 2x2 max pooling after
    the second (batch norm after the pooling, as in the original code, or before it), then dense layers."""
    layers: list[nn.Module] = []
    c_in = 3
    for c in (8, 16):
        layers += [BinaryConv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), BinaryConv2d(c, c, 3, padding=1)]
        tail = [nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.MaxPool2d(2), *tail] if bn_after_pool else [*tail, nn.MaxPool2d(2)]
        c_in = c
    layers += [nn.Flatten(), BinaryLinear(16 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(), BinaryLinear(32, 10),
               nn.BatchNorm1d(10)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("bn_after_pool", [True, False])
def test_conv_net_matches_the_eval_model(bn_after_pool):
    model = calibrate(_small_convnet(bn_after_pool), torch.randn(256, 3, 16, 16))
    net = export_model(model, (3, 16, 16))
    kinds = [la["type"] for la in net.layers]
    # a batch norm after max pooling cannot be folded into the convolution: it stays an affine layer
    assert kinds.count("affine") == (2 if bn_after_pool else 0)
    assert kinds.count("conv2d") == 4 and kinds.count("maxpool2d") == 2
    for batch in (1, 5, 37):  # 37: tiles of 16 columns end partially filled
        _check_against_model(model, net, torch.randn(batch, 3, 16, 16))


def _mixed_convnet() -> nn.Sequential:
    """Binary and float layers interleaved, so that the native engine changes layout between them: a
    binary conv with padding="same", float convs right after binary ones (BinaryConv2d with
    binarization="none", then a plain nn.Conv2d with padding="valid"), a batch norm without affine
    parameters, max pooling padded by exactly half its kernel, and a plain nn.Linear last."""
    return nn.Sequential(
        BinaryConv2d(3, 8, 3, padding="same"), nn.BatchNorm2d(8), nn.ReLU(),
        BinaryConv2d(8, 8, 3, padding=1, bias=True, binarization="none"), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        BinaryConv2d(8, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="valid"),  # 10x10 -> 8x8
        nn.MaxPool2d(2, padding=1),  # 8x8 -> 5x5
        nn.BatchNorm2d(6, affine=False),  # after pooling: an affine layer
        nn.Flatten(), BinaryLinear(6 * 5 * 5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10),
    )


def test_mixed_binary_and_float_net_matches_the_eval_model():
    model = calibrate(_mixed_convnet(), torch.randn(256, 3, 10, 10))
    net = export_model(model, (3, 10, 10))
    assert [la["type"] for la in net.layers] == [
        "conv2d", "relu", "conv2d", "relu", "conv2d", "relu", "conv2d", "maxpool2d", "affine", "flatten", "linear",
        "relu", "linear"]
    convs = [la for la in net.layers if la["type"] == "conv2d"]
    assert [la["padding"] for la in convs] == [[1, 1], [1, 1], [1, 1], [0, 0]]  # "same", 1, 1, "valid"
    assert [la["binary"] for la in convs] == [True, False, True, False]
    assert [la["binary"] for la in net.layers if la["type"] == "linear"] == [True, False]
    assert net.layers[7]["padding"] == [1, 1]
    # BatchNorm2d(affine=False) folds into the float conv before it: scale 1 / sqrt(var + eps), offset
    # (bias - mean) / sqrt(var + eps)
    bn, conv = model[4], model[3]
    g = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    torch.testing.assert_close(net.tensor(2, "scale").double(), g, rtol=1e-6, atol=0)
    torch.testing.assert_close(net.tensor(2, "offset").double(), g * (conv.bias.double() - bn.running_mean.double()),
                               rtol=1e-5, atol=1e-6)
    for batch in (1, 8, 17):  # 8: the first float conv's input channels ([C, B, H, W] is then a valid [B, C, H, W])
        _check_against_model(model, net, torch.randn(batch, 3, 10, 10))


def _expected_rows(model: nn.Module, input_shape) -> list[dict]:
    """The summary's rows, derived from the PyTorch model alone: the leaf modules in order, each one's output
    shape recorded by a forward hook on one example. A batch norm right after a conv/linear layer is folded into
    it (no row); any other becomes an affine layer. Parameters of the float32 network: the weights plus a scale
    and an offset per output (channel); MACs: out x in for a linear layer, out x in x kh x kw x OH x OW for a
    convolution, all of them additions where the weights are binary; bytes in the file: the weights at 1 bit each
    (each row padded to whole bytes) or in float32, and the float32 scale and offset vectors."""
    leaves = [m for m in model.modules() if not list(m.children())]
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, list(o.shape[1:]))) for m in leaves]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    rows, prev = [], None
    for m in leaves:
        shape = shapes[m]
        row = {"output_shape": shape, "params": 0, "binary_params": 0, "macs": 0, "packed_bytes": 0}
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            binary = getattr(m, "binarization", "none") != "none"
            if isinstance(m, nn.Linear):
                weights, macs = m.out_features * m.in_features, m.out_features * m.in_features
            else:
                kh, kw = m.kernel_size
                oh, ow = shape[1:]
                weights = m.out_channels * m.in_channels * kh * kw
                macs = weights * oh * ow
            out = shape[0]
            fan_in = weights // out
            weight_bytes = out * math.ceil(fan_in / 8) if binary else 4 * weights  # 1 bit or float32 per weight
            row.update(type="conv2d" if isinstance(m, nn.Conv2d) else "linear", params=weights + 2 * out,
                       binary_params=weights if binary else 0, macs=macs, packed_bytes=weight_bytes + 2 * 4 * out)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if isinstance(prev, (nn.Linear, nn.Conv2d)):
                prev = m
                continue  # folded into the layer before it
            row.update(type="affine", params=2 * m.num_features, packed_bytes=2 * 4 * m.num_features)
        else:
            row["type"] = {nn.ReLU: "relu", nn.MaxPool2d: "maxpool2d", nn.Flatten: "flatten"}[type(m)]
        row.update(float32_bytes=4 * row["params"], macs_replaced=row["macs"] if row["binary_params"] else 0)
        rows.append(row)
        prev = m
    return rows


SUMMARY_NETS = {  # name: (model, input shape)
    "bn after pool": (lambda: _small_convnet(True), (3, 16, 16)),
    "bn before pool": (lambda: _small_convnet(False), (3, 16, 16)),
    "mixed binary and float": (_mixed_convnet, (3, 10, 10)),
}


def test_a_float_sequential_binarized_in_place_exports_and_matches():
    """``binarize_modules_`` on a float network of supported layers, last layer kept in float: the export
    packs the converted layers (1 bit per weight) and predicts as the model does, on both engines."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 32, bias=False), nn.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 10))
    binarize_modules_(model, exclude=["8"])
    calibrate(model, torch.randn(256, 3, 8, 8))
    net = export_model(model, (3, 8, 8))
    assert [la["binary"] for la in net.layers if la["type"] in ("conv2d", "linear")] == [True, True, False]
    _check_against_model(model, net, torch.randn(64, 3, 8, 8))


@pytest.mark.parametrize("name", SUMMARY_NETS)
def test_conv_net_summary_counts_every_layer(name):
    """``summarize`` on convnets, row by row, against ``_expected_rows``: conv MACs include OH x OW, binary and
    float layers count their folded scale and offset, affine layers (batch norm after pooling) count 2 x channels,
    one scale multiplication per output of every linear, conv and affine layer; totals are the sums of the rows."""
    build, input_shape = SUMMARY_NETS[name]
    model = calibrate(build(), torch.randn(256, *input_shape))
    net = export_model(model, input_shape)
    expected = _expected_rows(model, input_shape)
    assert [la["type"] for la in net.layers] == [r["type"] for r in expected]
    assert sum(r["type"] == "affine" for r in expected) == {"bn after pool": 2, "bn before pool": 0}.get(name, 1)
    summary = summarize(net)
    rows = summary["rows"]
    assert len(rows) == len(expected) + 1 and rows[-1].layer == "safetensors header"
    for i, (row, exp) in enumerate(zip(rows[:-1], expected, strict=True)):
        assert row.index == i
        got = {k: getattr(row, k) for k in exp if k != "type"}
        assert got == {k: v for k, v in exp.items() if k != "type"}, (i, row.layer)
    # the first layer, by hand: a binary 3x3 conv, 3 -> 8 channels, keeping the input's height and width
    _, h, w = input_shape
    assert rows[0].macs == rows[0].macs_replaced == 8 * 3 * 3 * 3 * h * w
    assert rows[0].params == 8 * 3 * 3 * 3 + 2 * 8
    total = summary["total"]
    for field in ("params", "binary_params", "float32_bytes", "packed_bytes", "macs", "macs_replaced"):
        assert getattr(total, field) == sum(getattr(r, field) for r in rows), field
    assert total.params == sum(r["params"] for r in expected) and total.float32_bytes == 4 * total.params
    assert total.packed_bytes == summary["file_bytes"] == len(net.to_bytes())
    scaled = [r for r in expected if r["type"] in ("linear", "conv2d", "affine")]
    assert summary["scale_multiplications"] == sum(math.prod(r["output_shape"]) for r in scaled)


def test_registered_convnet_exports():
    assert "convnet" in list_models()
    model = create_model("convnet", input_shape=(3, 16, 16), channels=(8, 16, 16), hidden=32)
    calibrate(model, torch.randn(128, 3, 16, 16))
    net = export_model(model, (3, 16, 16))
    assert sum(la["type"] == "conv2d" for la in net.layers) == 6
    _check_against_model(model, net, torch.randn(4, 3, 16, 16))


def test_float_layers_export_as_float32_and_are_not_binary():
    model = create_model("mlp", hidden=64, depth=2, binarize_first=False, binarize_last=False)
    calibrate(model, torch.rand(256, 1, 28, 28) * 2 - 1)
    net = export_model(model, (1, 28, 28))
    linears = [(i, la) for i, la in enumerate(net.layers) if la["type"] == "linear"]
    assert [la["binary"] for _, la in linears] == [False, True, False]
    first = linears[0][0]
    assert net.tensor(first, "weight").dtype == torch.float32
    assert torch.equal(net.tensor(first, "weight"), model.layers[1].weight.detach())
    _check_against_model(model, net, torch.rand(16, 1, 28, 28) * 2 - 1)
    summary = summarize(net)
    rows = {r.index: r for r in summary["rows"]}
    assert rows[first].binary_params == 0 and rows[first].macs_replaced == 0 and "(float32)" in rows[first].layer
    binary_macs = 64 * 64
    total_macs = 784 * 64 + 64 * 64 + 64 * 10
    assert summary["total"].macs == total_macs and summary["total"].macs_replaced == binary_macs


def test_stochastic_model_exports_sign_of_latent_weights():
    model = create_model("mlp", hidden=32, depth=1, binarization="stochastic")
    calibrate(model, torch.rand(256, 1, 28, 28) * 2 - 1)  # (stochastic forward passes: any statistics do)
    net = export_model(model, (1, 28, 28))
    assert "sign(W)" in net.source["stochastic_weights"]
    assert [la["binarization"] for la in net.layers if la["type"] == "linear"] == ["stochastic"] * 2
    twin = copy.deepcopy(model)
    for m in twin.modules():
        if isinstance(m, BinaryLinear):
            m.binarization = "deterministic"  # H * sign(W)
    x = torch.rand(16, 1, 28, 28) * 2 - 1
    _check_against_model(twin.eval(), net, x)
    # the paper's test-time network (real-valued weights) is a different function
    assert not torch.allclose(model.eval()(x), twin(x), atol=1e-3)


def test_bias_and_unfolded_batch_norm():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(20), BinaryLinear(20, 12, bias=True, H=0.5), nn.ReLU(),
                          nn.BatchNorm1d(12), BinaryLinear(12, 6, bias=True), nn.BatchNorm1d(6), nn.Dropout(0.5),
                          nn.Identity())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryLinear):
                m.bias.normal_()
    calibrate(model, torch.randn(128, 4, 5))
    net = export_model(model, (4, 5))
    assert [la["type"] for la in net.layers] == ["flatten", "affine", "linear", "relu", "affine", "linear"]
    assert net.layers[2]["H"] == 0.5
    _check_against_model(model, net, torch.randn(9, 4, 5))


def test_unsupported_layer_is_refused():
    with pytest.raises(ExportError, match="cannot export layer Tanh"):
        export_model(nn.Sequential(nn.Flatten(), BinaryLinear(4, 3), nn.Tanh()), (4,))
    with pytest.raises(ExportError, match="groups=1"):
        export_model(nn.Sequential(BinaryConv2d(4, 4, 3, groups=2), nn.Flatten()), (4, 5, 5), num_classes=36)


def test_batch_norm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Flatten(), BinaryLinear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ExportError, match="no running statistics \\(track_running_stats=False\\)"):
        export_model(model, (4,))


def test_padding_same_that_cannot_be_symmetric_is_refused():
    model = nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    with pytest.raises(ExportError, match="padding='same' is asymmetric"):
        export_model(model, (2, 4, 4))


def test_max_pool_padding_over_half_the_kernel_is_refused():
    # PyTorch refuses it only when the model runs; the export refuses it while validating the layers
    model = nn.Sequential(nn.MaxPool2d(2, padding=2), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)).eval()
    with pytest.raises(ExportError, match="padding \\[2, 2\\] exceeds half the kernel \\[2, 2\\]"):
        export_model(model, (2, 6, 6))
    # exactly half the kernel is allowed (the mixed net above runs it)
    net = export_model(nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), (2, 6, 6))
    assert net.layers[0]["padding"] == [1, 1]


def test_a_forward_that_is_not_the_layer_sequence_is_caught():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = BinaryLinear(10, 10)
            self.fc2 = BinaryLinear(10, 10)

        def forward(self, x):
            return x + self.fc2(self.fc1(x))

    with pytest.raises(ExportError, match="disagrees with the model"):
        export_model(Residual().eval(), (10,))


def test_file_size_is_one_bit_per_weight_plus_scales_and_header(tmp_path):
    model = create_model("mlp")
    net = export_model(calibrate(model, torch.rand(256, 1, 28, 28) * 2 - 1), (1, 28, 28))
    path = tmp_path / "mlp.bcnn"
    size = net.save(path)
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    shapes = [(784, 1024), (1024, 1024), (1024, 1024), (1024, 10)]
    bits = sum(n * packed_size(k) for k, n in shapes)
    vectors = sum(2 * 4 * n for _, n in shapes)  # scale and offset, float32
    assert size == bits + vectors + header
    float32_weights = 4 * sum(k * n for k, n in shapes)
    assert float32_weights / bits == 32
    summary = summarize(net, data)
    assert summary["total"].packed_bytes == size == path.stat().st_size
    assert sum(r.packed_bytes for r in summary["rows"]) == size
    assert summary["total"].binary_params == sum(k * n for k, n in shapes)
    assert summary["total"].macs_replaced == summary["total"].macs
    assert summary["scale_multiplications"] == 1024 * 3 + 10  # one per output: the folded batch-norm scale
    assert load_packed(path, engine="torch").num_classes == 10


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_input_handling(engine):
    from binaryconnect.errors import ConfigError

    model = calibrate(create_model("mlp", hidden=16, depth=1), torch.rand(64, 1, 28, 28))
    packed = PackedModel(export_model(model, (1, 28, 28)), engine=engine)
    x = torch.rand(8, 1, 28, 28)
    expected = packed(x)
    # other batch sizes may sum in another order (another kernel): float32 rounding apart, the same
    torch.testing.assert_close(packed(x[3]), expected[3:4], rtol=1e-5, atol=1e-5)  # one example, no batch dim
    assert torch.equal(packed(x.double()), expected)  # converted to float32
    torch.testing.assert_close(packed(x[::2]), expected[::2], rtol=1e-5, atol=1e-5)  # non-contiguous
    assert packed(x[:0]).shape == (0, 10)
    assert torch.equal(packed.predict(x, batch_size=3), expected.argmax(1))
    assert packed.predict(x[:0]).dtype == torch.int64 and packed.predict(x[:0]).shape == (0,)
    with pytest.raises(ConfigError, match="does not match the model's input shape \\[batch, 1, 28, 28\\]"):
        packed(torch.rand(2, 784))


def test_recalibrated_statistics_are_the_average_batch_statistics_of_the_exported_weights():
    """Oracle, by hand: the batches of the seeded order, the binary layers with H * sign(W) (the stochastic
    one too), each batch norm normalizing with its batch's statistics (training mode); each running mean
    (variance) must be the average of the batch means (unbiased variances). Dropout stays off."""
    torch.manual_seed(0)
    model = nn.Sequential(BinaryLinear(6, 5, binarization="stochastic", H=0.5), nn.BatchNorm1d(5, momentum=0.3),
                          nn.ReLU(), nn.Dropout(0.5), BinaryLinear(5, 3), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[0].weight.uniform_(-0.5, 0.5)
    x = torch.randn(45, 6)
    before = copy.deepcopy(model.state_dict())
    result, used = recalibrate_batch_norm(model, x, batches=4, batch_size=10, seed=3)
    assert used == 40
    order = torch.randperm(45, generator=torch.Generator().manual_seed(3))[:40]
    w1 = torch.where(model[0].weight >= 0, 0.5, -0.5).detach()
    w2 = torch.where(model[4].weight >= 0, 1.0, -1.0).detach()
    stats = [[], []]
    for i in range(0, 40, 10):
        a1 = x[order[i:i + 10]] @ w1.t()
        stats[0].append((a1.mean(0), a1.var(0)))
        h = torch.nn.functional.batch_norm(a1, None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps)
        a2 = h.clamp_min(0) @ w2.t()
        stats[1].append((a2.mean(0), a2.var(0)))
    for bn, batch_stats in zip((result[1], result[5]), stats, strict=True):
        torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in batch_stats]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in batch_stats]).mean(0))
    # the result: eval mode, its layers as they were (stochastic, momenta); the model itself untouched
    assert not result.training and result[0].binarization == "stochastic"
    assert (result[1].momentum, result[5].momentum) == (0.3, 0.1)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model[0].binarization == "stochastic"
    # it exports as H * sign(W) with the new statistics, as the PyTorch twin computes
    net = export_model(result, (6,))
    twin = copy.deepcopy(result)
    twin[0].binarization = "deterministic"
    torch.testing.assert_close(PackedModel(net, engine="torch")(x), twin(x), rtol=1e-5, atol=1e-5)


def test_recalibration_refuses_a_model_without_batch_norm_and_batches_of_one():
    with pytest.raises(ExportError, match="no batch norm"):
        recalibrate_batch_norm(nn.Sequential(BinaryLinear(4, 2)), torch.randn(8, 4), 2, 4)
    with pytest.raises(ExportError, match="at least 2 examples"):
        recalibrate_batch_norm(nn.Sequential(BinaryLinear(4, 2), nn.BatchNorm1d(2)), torch.randn(8, 4), 2, 1)
    untracked = nn.Sequential(BinaryLinear(4, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ExportError, match="keeps no running statistics"):
        recalibrate_batch_norm(untracked, torch.randn(8, 4), 2, 4)


def test_engines_compute_in_float32_whatever_torch_default_dtype():
    """With torch's default dtype float64, the native engine's buffers must still be float32 (the kernels read
    and write raw float32 memory): same logits as with the default float32."""
    model = calibrate(_small_convnet(), torch.randn(64, 3, 16, 16))
    net = export_model(model, (3, 16, 16))
    x = torch.randn(5, 3, 16, 16)
    expected = {engine: PackedModel(net, engine=engine)(x) for engine in ENGINES}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for engine in ENGINES:
            got = PackedModel(net, engine=engine)(x)
            assert got.dtype == torch.float32 and torch.equal(got, expected[engine]), engine
            assert PackedModel(net, engine=engine)(x[:0]).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
