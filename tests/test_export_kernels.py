"""The compiled kernels against float64 math, on every instruction set this CPU has; build and fallback.

Oracle: ``y = scale * conv(x, s) + offset`` (then ReLU) computed in float64 with the +-1 signs ``s``.
Tolerance: the float32 rounding bound of a sum of K terms, ``|err| <= K * eps32 * sum_k |x_k|`` per output
(times ``|scale|``), plus ``4 eps32 |y|`` for the epilogue. A wrong sign on a single weight moves an
output by ``2 |x_k|``, far above it.
"""

import subprocess

import pytest
import torch
import torch.nn.functional as F

from binaryconnect.errors import ConfigError, DataError
from binaryconnect.export import engine, native
from binaryconnect.export.pack import pack_bits

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def kernels():
    k = native.load()  # gcc is required where the tests run: a build failure fails here
    yield k
    k.set_isa(None)


def _use_isa(kernels, isa):
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks {isa} (it has {kernels.supported_isas()})")
    kernels.set_isa(isa)


def _run(kernels, x, signs, scale, offset, stride=(1, 1), padding=(0, 0), dilation=(1, 1), relu=False,
         threads=1, mode=0):
    """x [C, B, H, W]; signs bool [N, C, kh, kw]."""
    c, b, h, w = x.shape
    n, _, kh, kw = signs.shape
    wr = pack_bits(signs.reshape(n, -1))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.full((n, b, oh, ow), float("nan"))
    geometry = (b, c, h, w, kh, kw, *stride, *padding, *dilation)
    return kernels.conv2d(x, geometry, wr, scale, offset, relu, out, threads, mode)


def _reference(x, signs, scale, offset, stride=(1, 1), padding=(0, 0), dilation=(1, 1), relu=False):
    """float64 result and its rounding bound, both [N, B, OH, OW]."""
    s = signs.double() * 2 - 1
    xb = x.double().transpose(0, 1)
    acc = F.conv2d(xb, s, stride=stride, padding=padding, dilation=dilation)
    mass = F.conv2d(xb.abs(), torch.ones_like(s), stride=stride, padding=padding, dilation=dilation)
    y = acc * scale.double()[None, :, None, None] + offset.double()[None, :, None, None]
    k = s[0].numel()
    bound = (k + 2) * EPS32 * mass * scale.double().abs()[None, :, None, None] + 4 * EPS32 * y.abs() + 1e-30
    if relu:
        y = y.clamp_min(0)
    return y.transpose(0, 1), bound.transpose(0, 1)


def _check(got, ref, bound):
    assert not torch.isnan(got).any()
    err = (got.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds the float32 bound (ratio {worst:.2f})"


def _layer(c, n, kh=1, kw=1, relu=True):
    signs = torch.rand(n, c, kh, kw) < 0.5
    scale = torch.rand(n) + 0.25
    scale[::3] *= -1  # negative folded scales exist (negative batch-norm gamma)
    return signs, scale, torch.randn(n), relu


LINEAR = [(1, 1, 1), (13, 7, 5), (784, 1024, 1), (100, 33, 37), (1024, 10, 256), (9, 300, 17), (64, 64, 16),
          (1000, 17, 3), (8, 8, 40)]


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("k, n, b", LINEAR)
def test_linear_matches_float64(kernels, isa, k, n, b):
    _use_isa(kernels, isa)
    signs, scale, offset, relu = _layer(k, n)
    x = torch.randn(k, b, 1, 1)
    ref, bound = _reference(x, signs, scale, offset, relu=relu)
    results = {}
    for mode in (0, 1, 2, 3):  # chosen, 256-entry tables, one column at a time, 16-entry tables
        for threads in (1, 2):
            results[mode, threads] = got = _run(kernels, x, signs, scale, offset, relu=relu, threads=threads, mode=mode)
            _check(got, ref, bound)
        # each output is summed by one thread in a fixed order: the thread count changes nothing
        assert torch.equal(results[mode, 1], results[mode, 2])


CONV = [  # C, B, H, W, N, kernel, stride, padding, dilation
    (3, 2, 9, 11, 20, (3, 3), (1, 1), (1, 1), (1, 1)),
    (5, 3, 8, 8, 9, (3, 2), (2, 1), (1, 0), (1, 2)),
    (16, 2, 32, 32, 24, (3, 3), (1, 1), (1, 1), (1, 1)),
    (7, 1, 5, 40, 13, (1, 5), (1, 3), (0, 2), (1, 1)),
    (2, 5, 4, 4, 3, (4, 4), (1, 1), (0, 0), (1, 1)),
    (33, 1, 6, 6, 40, (3, 3), (2, 2), (1, 1), (1, 1)),
    (16, 1, 1, 1, 64, (1, 1), (1, 1), (0, 1), (1, 1)),  # 1x1 kernel on a 1x1 map, padded: not a linear layer
    (16, 2, 1, 1, 8, (1, 1), (1, 1), (1, 1), (1, 1)),
]


@pytest.mark.parametrize("isa", native.ISAS)
@pytest.mark.parametrize("c, b, h, w, n, kernel, stride, padding, dilation", CONV)
def test_conv_matches_float64(kernels, isa, c, b, h, w, n, kernel, stride, padding, dilation):
    _use_isa(kernels, isa)
    signs, scale, offset, relu = _layer(c, n, *kernel)
    x = torch.randn(c, b, h, w)
    ref, bound = _reference(x, signs, scale, offset, stride, padding, dilation, relu)
    for mode in (0, 1, 3):  # chosen, 256-entry tables, 16-entry tables
        one = _run(kernels, x, signs, scale, offset, stride, padding, dilation, relu, threads=1, mode=mode)
        two = _run(kernels, x, signs, scale, offset, stride, padding, dilation, relu, threads=2, mode=mode)
        _check(one, ref, bound)
        assert torch.equal(one, two)


def test_isas_agree_with_each_other(kernels):
    signs, scale, offset, relu = _layer(300, 50)
    x = torch.randn(300, 20, 1, 1)
    outs = []
    for isa in kernels.supported_isas():
        kernels.set_isa(isa)
        outs.append(_run(kernels, x, signs, scale, offset, relu=relu))
    kernels.set_isa(None)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-4)


def test_best_isa_is_the_default(kernels):
    kernels.set_isa(None)
    assert kernels.isa == kernels.supported_isas()[-1]
    assert "scalar" in kernels.supported_isas()
    with pytest.raises(ValueError, match="unknown instruction set"):
        kernels.set_isa("avx9")


def test_kernel_rejects_bad_geometry(kernels):
    signs, scale, offset, _ = _layer(3, 4, 3, 3)
    with pytest.raises(RuntimeError, match="invalid layer geometry"):  # one-column mode is for linear layers
        _run(kernels, torch.randn(3, 1, 5, 5), signs, scale, offset, mode=2)



POOLS = [  # c, b, h, w, kernel, stride, padding
    (3, 2, 8, 8, (2, 2), (2, 2), (0, 0)),  # the convnets' pooling
    (2, 3, 7, 9, (2, 2), (2, 2), (0, 0)),  # odd sizes: the last row and column are dropped (floor mode)
    (2, 1, 7, 6, (3, 3), (2, 2), (1, 1)),  # padded by half the kernel: padding never wins
    (1, 2, 5, 8, (3, 2), (1, 3), (1, 0)),
    (4, 1, 6, 6, (1, 1), (1, 1), (0, 0)),
    (2, 2, 4, 4, (4, 4), (4, 4), (2, 2)),
]


@pytest.mark.parametrize("c, b, h, w, kernel, stride, padding", POOLS)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_maxpool_fused_with_affine_and_relu_matches_pytorch(kernels, c, b, h, w, kernel, stride, padding, affine,
                                                            relu):
    """Oracle: ``F.max_pool2d`` of every [H, W] plane, then ``scale[c] * . + offset[c]`` and ``max(., 0)`` in
    float32, as the torch engine computes them: the fused kernel does the same float32 operations, so the
    results are equal, bit for bit."""
    x = torch.randn(c, b, h, w)
    scale, offset = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    ref = F.max_pool2d(x, kernel, stride, padding)
    if affine:
        ref = ref * scale[:, None, None, None] + offset[:, None, None, None]
    if relu:
        ref = ref.clamp_min(0)
    for threads in (1, 2):
        got = kernels.maxpool2d(x, kernel, stride, padding, scale, offset, relu, threads)
        assert got.shape == ref.shape
        assert torch.equal(got, ref)


def test_maxpool_propagates_nan_and_infinities_like_pytorch(kernels):
    x = torch.randn(2, 1, 4, 4)
    x[0, 0, 0, 1] = float("nan")  # second in its window: a NaN anywhere in a window wins
    x[0, 0, 3, 3] = float("inf")
    x[1, 0, 2:, :2] = float("-inf")  # a window of -inf only
    x[1, 0, 0, 0] = float("nan")  # first in its window, beside larger values
    x[1, 0, 0, 1] = 5.0
    ref = F.max_pool2d(x, 2, 2)
    got = kernels.maxpool2d(x, (2, 2), (2, 2), (0, 0), None, None, False, 1)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().sum() == 2
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_maxpool_rejects_bad_geometry(kernels):
    with pytest.raises(RuntimeError, match="invalid layer geometry"):  # padding over half the kernel
        kernels.maxpool2d(torch.randn(1, 1, 4, 4), (2, 2), (2, 2), (2, 0), None, None, False, 1)
    with pytest.raises(ValueError, match="scale and offset must both have shape"):
        kernels.maxpool2d(torch.randn(2, 1, 4, 4), (2, 2), (2, 2), (0, 0), torch.ones(3), torch.ones(3), False, 1)


def test_native_plan_pools_normalizes_and_rectifies_in_one_step():
    """The original code's ``conv -> MaxPool2D -> BatchNorm -> ReLU``: the native engine runs the three as one
    pooling step (the torch engine keeps them apart); the outputs are checked in test_export_convert.py."""
    from binaryconnect.export import export_model
    from binaryconnect.models import create_model

    net = export_model(create_model("convnet", num_classes=10).eval(), (3, 32, 32))
    kinds = [la["type"] for la in net.layers]
    assert kinds.count("maxpool2d") == 3 and kinds.count("affine") == 3
    steps = engine.PackedModel(net, engine="native").steps
    pools = [s for s in steps if s.kind == "maxpool2d"]
    assert len(pools) == 3 and all(s.scale is not None and s.relu for s in pools)
    assert not [s for s in steps if s.kind in ("affine", "relu")]
    torch_steps = engine.PackedModel(net, engine="torch").steps
    assert [s.kind for s in torch_steps].count("affine") == 3

def test_build_compiles_once_then_reuses_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    real_run = subprocess.run
    compiles = []

    def counting_run(cmd, *args, **kwargs):
        if "--version" not in cmd:  # the compiler's version is read every time: it is part of the cache key
            compiles.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    lib = native.build()
    assert lib.parent == tmp_path and lib.is_file()
    assert len(compiles) == 1 and str(native.KERNEL_DIR / "bcnn_kernels.cpp") in compiles[0]  # an empty cache builds
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind
    before = lib.stat()

    def no_compile(cmd, *args, **kwargs):
        if "--version" in cmd:
            return real_run(cmd, *args, **kwargs)
        raise AssertionError(f"the cached library was rebuilt: {cmd}")

    monkeypatch.setattr(subprocess, "run", no_compile)
    assert native.build() == lib
    after = lib.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert native.Kernels(lib).isa in native.ISAS


def test_no_compiler_falls_back_to_pytorch(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / c++ there
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native, "_kernels", None)
    monkeypatch.setattr(native, "_failure", None)
    with pytest.raises(native.NativeUnavailable, match="no C\\+\\+ compiler found"):
        native.build()
    with pytest.warns(RuntimeWarning, match="pure PyTorch engine"):
        assert engine.resolve_engine("auto") == "torch"
    with pytest.raises(native.NativeUnavailable):
        engine.resolve_engine("native")
    assert engine.resolve_engine("torch") == "torch"


def test_engine_choice_from_environment(monkeypatch, kernels):
    monkeypatch.setenv(engine.ENV_ENGINE, "torch")
    assert engine.resolve_engine() == "torch"
    assert engine.resolve_engine("native") == "native"  # the argument wins
    monkeypatch.setenv(engine.ENV_ENGINE, "gpu")
    with pytest.raises(ConfigError, match="unknown engine 'gpu'"):
        engine.resolve_engine()


def _small_packed(kind):
    from binaryconnect.export import export_model
    from binaryconnect.models import create_model

    torch.manual_seed(0)
    if kind == "mlp":
        return export_model(create_model("mlp", input_shape=(1, 8, 8), hidden=32).eval(), (1, 8, 8))
    model = create_model("convnet", input_shape=(3, 8, 8), channels=(4, 4, 4), hidden=8).eval()
    return export_model(model, (3, 8, 8))


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("eng", ["native", "torch"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan"), 2e38, -3e38])
def test_packed_model_refuses_nan_infinities_and_values_beyond_half_float32s_largest(kind, eng, bad):
    """An infinity (which the native engine's doubled sums turn into NaN, and a ReLU may hide), a NaN, or a
    value beyond half float32's largest (where the native engine's sums overflow, into NaN or into finite
    nonsense) in one example: a ``DataError`` naming that example, on either engine; the batch without it runs."""
    model = engine.PackedModel(_small_packed(kind), engine=eng)
    x = torch.randn(4, *model.input_shape)
    assert torch.isfinite(model(x)).all()
    x.view(4, -1)[2, 5] = bad
    what = "NaN or infinite values" if abs(bad) > 3.5e38 or bad != bad else "values beyond \\+-1.7e\\+38"
    with pytest.raises(DataError, match=f"input holds {what}.* in example 2 of 4 \\(counted from 0\\)"):
        model(x)
    x.view(4, -1)[0, 7] = bad
    with pytest.raises(DataError, match="in examples 0, 2 of 4"):
        model(x)
    with pytest.raises(DataError, match="in example 0 of 1"):
        model(x[2:3] if bad != bad else x[0])  # one example, with or without its batch dimension


def test_the_native_engine_is_not_given_the_input_that_fooled_it():
    """Inputs beyond half float32's largest can give the native engine finite logits where float32 PyTorch
    gives NaN (found by a review of the first version of the check, which looked at the input only when the
    logits were not finite): the kernels given -2e38 at each of 64 positions in turn (seeded), then
    ``PackedModel``, which refuses them all."""
    from binaryconnect.export import export_model
    from binaryconnect.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", input_shape=(1, 8, 8), hidden=32).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, 1, 8, 8))  # batch-norm statistics of a few batches
    packed = engine.PackedModel(export_model(model.eval(), (1, 8, 8)), engine="native")
    fooled = []
    for position in range(64):
        torch.manual_seed(position)
        x = torch.randn(3, 1, 8, 8)
        x.view(3, -1)[1, position] = -2e38
        with torch.no_grad():
            assert not torch.isfinite(model(x)[1]).all()
        if torch.isfinite(packed._forward_native(x)[1]).all():
            fooled.append(position)
        with pytest.raises(DataError, match="in example 1 of 3"):
            packed(x)
    assert fooled  # [3] with torch 2.14.1 on the CPU


def test_a_float64_value_beyond_float32s_range_is_named_so():
    model = engine.PackedModel(_small_packed("mlp"), engine="torch")
    x = torch.randn(2, *model.input_shape, dtype=torch.float64)
    x.view(2, -1)[1, 0] = 1e39
    with pytest.raises(DataError, match="or values beyond float32's range\\) in example 1 of 2"):
        model(x)


def test_packed_model_returns_logits_that_overflow_from_inputs_within_range():
    """Finite inputs below half float32's largest whose sums still overflow deeper in the network: not the
    input's fault as the engine sees it, returned as they are (float32 PyTorch overflows there too)."""
    model = engine.PackedModel(_small_packed("mlp"), engine="native")
    x = torch.randn(2, *model.input_shape).sign() * 1e38  # sums of 64 of them, +-1e38 each, overflow
    assert x.abs().max() < engine.HALF_FLOAT32_MAX
    assert not torch.isfinite(model(x)).all()
