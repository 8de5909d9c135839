"""GCN, ZCA and LCN against NumPy float64 references written from their definitions (pylearn2's
``global_contrast_normalize`` and ``ZCA``, Jarrett et al.'s LCN)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binaryconnect.data import preprocess
from binaryconnect.data.preprocess import (
    ZCA,
    gaussian_window,
    global_contrast_normalize,
    local_contrast_normalize,
    preprocess_splits,
    preprocessing_params,
)
from binaryconnect.errors import ConfigError


def np_gcn(x, scale=55.0, sqrt_bias=0.0, use_std=False, min_divisor=1e-8):
    x = x.reshape(len(x), -1).astype(np.float64)
    x = x - x.mean(axis=1)[:, None]
    if use_std:
        norms = np.sqrt(sqrt_bias + x.var(axis=1, ddof=1)) / scale
    else:
        norms = np.sqrt(sqrt_bias + (x**2).sum(axis=1)) / scale
    norms[norms < min_divisor] = 1.0
    return x / norms[:, None]


def np_zca_fit(x, bias):
    x = x.reshape(len(x), -1).astype(np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    eigs, vecs = np.linalg.eigh(xc.T @ xc / len(x))
    return mean, vecs @ np.diag(1.0 / np.sqrt(eigs + bias)) @ vecs.T


def correlated(n, d, seed):
    """``n`` examples of ``d`` correlated features with a spread of variances (condition number ~1e3)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.logspace(0, -1.5, d)[None, :]
    return rng.normal(size=(n, d)) @ mixing.T + rng.normal(size=d) * 3


#: ``_CHUNK`` values the chunked loops run with: the real one (every test input fits one chunk) and 7, which
#: divides none of the sizes below, so that the outputs are written (and ZCA's covariance accumulated) over
#: several chunks with a short last one. ``_CHUNK`` is a module global read when the functions run.
CHUNKS = [preprocess._CHUNK, 7]


@pytest.fixture(params=CHUNKS, ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch) -> int:
    monkeypatch.setattr(preprocess, "_CHUNK", request.param)
    return request.param


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(64, 3, 8, 8), dtype=np.uint8)


@pytest.mark.parametrize("kw", [{}, {"scale": 1.0}, {"use_std": True, "sqrt_bias": 10.0}])
def test_gcn_matches_numpy(images, kw, chunk):
    assert len(images) % 7 != 0 and len(images) > 7
    got = global_contrast_normalize(torch.from_numpy(images), **kw)
    assert got.dtype == torch.float32 and got.shape == images.shape
    np.testing.assert_allclose(got.reshape(len(images), -1).numpy(), np_gcn(images, **kw), rtol=1e-5, atol=1e-5)


def test_gcn_norm_and_constant_image(images):
    images[3] = 77  # a constant image: zero after mean removal, divisor below min_divisor -> 1
    out = global_contrast_normalize(torch.from_numpy(images), scale=55.0).reshape(len(images), -1).double()
    norms = out.norm(dim=1)
    assert torch.all(out[3] == 0)
    others = torch.cat([norms[:3], norms[4:]])
    torch.testing.assert_close(others, torch.full_like(others, 55.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(len(out), dtype=torch.float64), atol=1e-5, rtol=0)


# more examples than features (eigh path), fewer (low-rank SVD path); chunked with 300 examples, not 3,000
# (429 chunks of 7: tiny ops whose thread-pool overhead costs seconds on a busy 2-core machine): 42 chunks + 6
@pytest.mark.parametrize(("n", "chunk"), [(3000, CHUNKS[0]), (300, 7), (20, CHUNKS[0]), (20, 7)],
                         indirect=["chunk"])
def test_zca_matches_numpy(n, chunk):
    assert n % 7 != 0
    train, test = correlated(n, 24, 1), correlated(500, 24, 2)
    zca = ZCA(filter_bias=0.1).fit(torch.from_numpy(train))
    mean, P = np_zca_fit(train, 0.1)
    np.testing.assert_allclose(zca.mean.numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(zca.matrix.numpy(), P, rtol=1e-8, atol=1e-10)
    lam = np.clip(np.linalg.eigvalsh(np.cov(train.T, bias=True)), 0, None)
    np.testing.assert_allclose(zca.eigenvalues.sort().values.numpy(), lam, rtol=1e-8, atol=1e-10)
    got = zca.apply(torch.from_numpy(test), dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, (test - mean) @ P, rtol=1e-9, atol=1e-9)
    got32 = zca.apply(torch.from_numpy(test))  # float32 by default
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), (test - mean) @ P, rtol=1e-4, atol=1e-4)


def test_zca_whitened_training_data_has_identity_covariance():
    """With filter bias 0, the whitened training data has covariance I (|C - I| < 1e-8, float64)."""
    train = torch.from_numpy(correlated(4000, 32, 3))
    white = ZCA(filter_bias=0.0).fit(train).apply(train, dtype=torch.float64)
    centered = white - white.mean(dim=0)
    cov = centered.T @ centered / len(white)
    torch.testing.assert_close(cov, torch.eye(32, dtype=torch.float64), atol=1e-8, rtol=0)
    assert white.mean(dim=0).abs().max() < 1e-10
    # ZCA is the symmetric whitening: the closest whitened data to the input (P symmetric positive definite)
    zca = ZCA(0.0).fit(train)
    torch.testing.assert_close(zca.matrix, zca.matrix.T)
    assert torch.linalg.eigvalsh(zca.matrix).min() > 0


def test_zca_with_bias_shrinks_eigenvalues_exactly():
    """With filter bias b, the whitened covariance has eigenvalues lambda / (lambda + b)."""
    train = torch.from_numpy(correlated(4000, 16, 4))
    zca = ZCA(filter_bias=0.5).fit(train)
    white = zca.apply(train, dtype=torch.float64)
    centered = white - white.mean(dim=0)
    got = torch.linalg.eigvalsh(centered.T @ centered / len(white))
    lam = zca.eigenvalues
    torch.testing.assert_close(got, (lam / (lam + 0.5)).sort().values, atol=1e-10, rtol=1e-8)


def test_zca_is_fitted_on_train_only(images):
    """The validation images go through the training split's GCN+ZCA statistics, not their own."""
    train, val = images[:48], (images[48:] // 2)  # val: darker, lower contrast: other statistics
    _, [got] = preprocess_splits(torch.from_numpy(train), [torch.from_numpy(val)], "gcn-zca", zca_bias=0.1)
    mean, P = np_zca_fit(np_gcn(train), 0.1)
    expected = (np_gcn(val) - mean) @ P
    np.testing.assert_allclose(got.reshape(len(val), -1).numpy(), expected, rtol=1e-4, atol=2e-4)
    mean_all, P_all = np_zca_fit(np_gcn(images), 0.1)  # fitting on train + val would give another result
    assert np.abs((np_gcn(val) - mean_all) @ P_all - expected).max() > 0.1


def test_zca_without_bias_on_gcn_data_is_refused(images):
    gcn = global_contrast_normalize(torch.from_numpy(np.concatenate([images] * 4)))  # 192 = d: rank <= d - 1
    with pytest.raises(ConfigError, match="filter bias"):
        ZCA(0.0).fit(gcn)
    with pytest.raises(ConfigError, match="filter bias"):
        ZCA(0.0).fit(torch.randn(10, 20))  # fewer examples than features
    # more examples than features: GCN leaves a null direction whose eigenvalue is round-off (+-1e-14), not 0;
    # seeds 2 and 4 give a positive one, which an absolute test (eigenvalue > 0) would accept
    for seed in range(5):
        many = global_contrast_normalize(torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 255)
        with pytest.raises(ConfigError, match="rank-deficient"):
            ZCA(0.0).fit(many)
        ZCA(0.1).fit(many)  # the paper's bias: fine


def test_gcn_zca_pipeline_matches_numpy(images):
    train, test = images[:48], images[48:]
    got_train, [got_test] = preprocess_splits(torch.from_numpy(train), [torch.from_numpy(test)], "gcn-zca",
                                              gcn_scale=55.0, zca_bias=0.1)
    g_train, g_test = np_gcn(train), np_gcn(test)
    mean, P = np_zca_fit(g_train, 0.1)
    np.testing.assert_allclose(got_train.reshape(48, -1).numpy(), (g_train - mean) @ P, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(got_test.reshape(16, -1).numpy(), (g_test - mean) @ P, rtol=1e-4, atol=2e-4)
    assert got_train.shape == train.shape and got_train.dtype == torch.float32


def test_none_scales_to_unit_range(images):
    out, [out2] = preprocess_splits(torch.from_numpy(images), [torch.from_numpy(images[:2])], "none")
    np.testing.assert_allclose(out.numpy(), images / 127.5 - 1.0, rtol=0, atol=1e-6)
    assert out2.shape == (2, 3, 8, 8)


def np_lcn(x, kernel=7, sigma=2.0, threshold=1e-4, pylearn2=False):
    """Direct (loop) LCN: zero-padded Gaussian window sums, per image and channel; ``pylearn2``: the local
    norm of the divisive step from the input, as pylearn2's ``lecun_lcn`` (``sum_sqr_XX = ... lmul(X ** 2)``)."""
    r = np.arange(kernel) - kernel // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    g /= g.sum()
    n, c, h, w = x.shape
    p = kernel // 2

    def blur(img):
        padded = np.pad(img, p)
        return np.array([[(padded[i : i + kernel, j : j + kernel] * g).sum() for j in range(w)] for i in range(h)])

    out = np.empty_like(x, dtype=np.float64)
    for a in range(n):
        for b in range(c):
            v = x[a, b] - blur(x[a, b])
            s = np.sqrt(blur((x[a, b] if pylearn2 else v) ** 2))
            out[a, b] = v / np.maximum(np.maximum(s, s.mean()), threshold)
    return out


def test_lcn_matches_numpy(chunk, monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(10, 3, 10, 9)) * rng.uniform(0.1, 3, size=(10, 3, 1, 1))  # 10 images: chunks 7 + 3
    calls = []  # each chunk makes two convolutions: proves the chunk size in force is the one asked for

    def conv2d(*args, **kwargs):
        calls.append(args[0].shape[0])
        return torch.nn.functional.conv2d(*args, **kwargs)

    monkeypatch.setattr(preprocess, "F", type("F", (), {"conv2d": staticmethod(conv2d)}))
    got = local_contrast_normalize(torch.from_numpy(x))
    expected_chunks = [3 * min(chunk, len(x) - i) for i in range(0, len(x), chunk)]  # images x channels
    assert calls == [b for b in expected_chunks for _ in range(2)]
    ref = np_lcn(x)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
    inplace = torch.from_numpy(x).float().clone()
    local_contrast_normalize(inplace, out=inplace)
    np.testing.assert_allclose(inplace.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_lcn_threshold_on_flat_images():
    out = local_contrast_normalize(torch.zeros(2, 1, 8, 8))  # 0 / max(0, 0, threshold): no 0/0
    assert torch.equal(out, torch.zeros(2, 1, 8, 8))


def test_gaussian_window():
    g = gaussian_window(7, 2.0)
    assert g.shape == (7, 7) and abs(g.sum().item() - 1) < 1e-12
    torch.testing.assert_close(g, g.T)
    torch.testing.assert_close(g, g.flip(0))
    assert g[3, 3] == g.max()
    assert abs(g[3, 5] / g[3, 3] - np.exp(-4 / 8)) < 1e-12
    with pytest.raises(ConfigError):
        gaussian_window(6)


def test_gcn_lcn_pipeline(images):
    out, [out2] = preprocess_splits(torch.from_numpy(images), [torch.from_numpy(images[:5])], "gcn-lcn",
                                    gcn_scale=1.0)
    ref = np_lcn(np_gcn(images, scale=1.0).reshape(images.shape))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out2.numpy(), ref[:5], rtol=1e-4, atol=1e-4)


def test_gcn_lcn_pylearn2_takes_the_local_norm_from_the_uncentred_image(images):
    """``gcn-lcn-pylearn2`` against the reference with pylearn2's divisive term, and not equal to ``gcn-lcn``
    (the two differ wherever the local mean is not zero); its cache key differs from ``gcn-lcn``'s."""
    out, [out2] = preprocess_splits(torch.from_numpy(images), [torch.from_numpy(images[:5])], "gcn-lcn-pylearn2",
                                    gcn_scale=1.0)
    gcn = np_gcn(images, scale=1.0).reshape(images.shape)
    ref = np_lcn(gcn, pylearn2=True)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out2.numpy(), ref[:5], rtol=1e-4, atol=1e-4)
    assert np.abs(out.numpy() - np_lcn(gcn)).max() > 0.1
    x = torch.from_numpy(gcn)
    np.testing.assert_allclose(local_contrast_normalize(x, norm_of="input").numpy(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="norm_of must be 'centered' or 'input'"):
        local_contrast_normalize(x, norm_of="raw")
    assert preprocessing_params("gcn-lcn-pylearn2", 1, 0.1)["name"] == "gcn-lcn-pylearn2"
    assert preprocessing_params("gcn-lcn-pylearn2", 1, 0.1).keys() == preprocessing_params("gcn-lcn", 1, 0.1).keys()


def test_unknown_preprocessing_and_params():
    with pytest.raises(ConfigError, match="gcn-zca"):
        preprocess_splits(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), [], "whiten")
    assert preprocessing_params("gcn-zca", 55, 0.1) == {"name": "gcn-zca", "gcn_scale": 55.0, "zca_bias": 0.1}
    assert preprocessing_params("gcn", 55, 0.1) == {"name": "gcn", "gcn_scale": 55.0}
    assert preprocessing_params("none", 55, 0.1) == {"name": "none"}
    with pytest.raises(ConfigError):
        global_contrast_normalize(torch.zeros(2, 4), scale=0.0)


# ---------------------------------------------------------------------------------------------------
# boundaries and option plumbing (mutants that survived)


def test_gcn_divisor_equal_to_min_divisor_is_kept_below_it_replaced_by_1():
    """A divisor is replaced by 1 only when strictly below ``min_divisor``, the bound given (pylearn2:
    ``normalizers[normalizers < min_divisor] = 1``). The example [1, -1, 1, -1] / 4 has mean 0 and L2 norm 0.5
    exactly (binary fractions), so with scale 1 its divisor is exactly 0.5: hand-computed outputs."""
    x = torch.tensor([[0.25, -0.25, 0.25, -0.25]])
    assert torch.equal(global_contrast_normalize(x, scale=1.0, min_divisor=0.5), x / 0.5)  # 0.5 is not below 0.5
    assert torch.equal(global_contrast_normalize(x, scale=1.0, min_divisor=0.5000001), x)  # below: divisor 1


def test_gcn_use_std_on_one_feature_gives_zeros_not_nan():
    """One feature per example: centred it is 0, and its variance is taken as 0 (an unbiased variance of one
    value is NaN): divisor sqrt(0) / scale < min_divisor, replaced by 1, so the output is 0 (as use_std=False)."""
    x = torch.tensor([[3.0], [-7.0], [255.0]])
    assert torch.equal(global_contrast_normalize(x, use_std=True), torch.zeros(3, 1))
    assert torch.equal(global_contrast_normalize(x, use_std=True, sqrt_bias=4.0, scale=1.0), torch.zeros(3, 1))


@pytest.mark.parametrize("scale", [0.0, -55.0, float("nan")])
def test_gcn_refuses_a_scale_that_is_not_positive(scale):
    """NaN is not positive either: it would turn every image into NaN."""
    with pytest.raises(ConfigError, match="gcn scale must be positive"):
        global_contrast_normalize(torch.zeros(2, 4), scale=scale)


def test_zca_eigenvalues_are_never_negative_on_gcn_data():
    """GCN removes one direction exactly: its covariance eigenvalue is 0 up to round-off, which ``eigh`` returns
    as about -1e-14 for 4 of these 5 seeds (measured). ``eigenvalues`` are a covariance's: clamped at 0."""
    for seed in range(5):
        many = global_contrast_normalize(torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 255)
        lam = ZCA(0.1).fit(many).eigenvalues
        assert lam.min() >= 0 and lam.min() < 1e-12 * lam.max()


@pytest.mark.parametrize("n", [20, 24, 30])  # fewer examples than the 24 features, as many (SVD path), more (eigh)
def test_zca_eigenvalues_are_ascending_on_both_paths(n):
    """``eigenvalues`` come in ascending order (as ``eigh`` gives them) on both paths, also the SVD path, whose
    singular values are descending: compared with NumPy's ``eigvalsh`` element by element, unsorted."""
    train = correlated(n, 24, 5)
    zca = ZCA(0.1).fit(torch.from_numpy(train))
    lam = np.clip(np.linalg.eigvalsh(np.cov(train.T, bias=True)), 0, None)
    np.testing.assert_allclose(zca.eigenvalues.numpy(), lam, rtol=1e-8, atol=1e-10)


def test_zca_refuses_one_example_and_a_nan_or_negative_bias():
    with pytest.raises(ConfigError, match="at least 2 training examples, got 1"):
        ZCA(0.1).fit(torch.randn(1, 5))
    for bad in (-0.1, float("nan")):
        with pytest.raises(ConfigError, match="zca filter bias must be >= 0"):
            ZCA(bad)


def test_gcn_zca_pipeline_uses_the_given_scale_and_bias(images):
    """``preprocess_splits`` passes ``gcn_scale`` and ``zca_bias`` on: scale 1 and bias 0.5 against the NumPy
    reference (the pipeline tests above use the defaults 55 and 0.1, which a dropped argument would also give).
    At scale 1 the per-feature variances are ~1/192, so bias 0.5 and 0.1 give outputs about sqrt(5) apart."""
    train, test = images[:48], images[48:]
    got_train, [got_test] = preprocess_splits(torch.from_numpy(train), [torch.from_numpy(test)], "gcn-zca",
                                              gcn_scale=1.0, zca_bias=0.5)
    g_train, g_test = np_gcn(train, scale=1.0), np_gcn(test, scale=1.0)
    mean, P = np_zca_fit(g_train, 0.5)
    np.testing.assert_allclose(got_train.reshape(48, -1).numpy(), (g_train - mean) @ P, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_test.reshape(16, -1).numpy(), (g_test - mean) @ P, rtol=1e-4, atol=1e-6)
    mean1, P1 = np_zca_fit(g_train, 0.1)
    assert np.abs((g_test - mean1) @ P1 - (g_test - mean) @ P).max() > 0.01  # the bias matters at this tolerance


def test_lcn_uses_the_given_kernel_sigma_and_threshold(images):
    """Kernel 5, sigma 1 and threshold 0.5 against the loop reference, directly and through ``preprocess_splits``
    (the tests above use the defaults 7, 2 and 1e-4, which a dropped argument would also give); each option
    changes the reference here, so each is checked."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 3, 9, 10)) * rng.uniform(0.05, 3, size=(4, 3, 1, 1))  # low- and high-contrast channels
    ref = np_lcn(x, kernel=5, sigma=1.0, threshold=0.5)
    for other in (np_lcn(x, 7, 1.0, 0.5), np_lcn(x, 5, 2.0, 0.5), np_lcn(x, 5, 1.0, 1e-4)):
        assert np.abs(other - ref).max() > 0.01
    np.testing.assert_allclose(local_contrast_normalize(torch.from_numpy(x), 5, 1.0, 0.5).numpy(), ref,
                               rtol=1e-5, atol=1e-5)
    u8 = images[:6]  # GCN at scale 1 of 192 values: local spreads ~0.07, so threshold 0.1 binds in places
    g = np_gcn(u8, scale=1.0).reshape(u8.shape)
    ref = np_lcn(g, kernel=5, sigma=1.0, threshold=0.1)
    for other in (np_lcn(g, 7, 1.0, 0.1), np_lcn(g, 5, 2.0, 0.1), np_lcn(g, 5, 1.0, 1e-4)):
        assert np.abs(other - ref).max() > 0.01
    out, [out2] = preprocess_splits(torch.from_numpy(u8), [torch.from_numpy(u8[:2])], "gcn-lcn", gcn_scale=1.0,
                                    lcn_kernel=5, lcn_sigma=1.0, lcn_threshold=0.1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out2.numpy(), ref[:2], rtol=1e-4, atol=1e-5)


def test_preprocessing_params_of_gcn_lcn_are_canonical_and_finite():
    """The cache key of ``gcn-lcn`` holds every LCN option, as float / int whatever number type was given (so
    that ``lcn_sigma=1`` and ``lcn_sigma=1.0``, one preprocessing, give one JSON key), and a non-finite option
    is refused (NaN != NaN: it could never hit the cache, and it is no preprocessing)."""
    import json

    params = preprocessing_params("gcn-lcn", 1, 0.1, 5, 1, 1)
    assert params == {"name": "gcn-lcn", "gcn_scale": 1.0, "lcn_kernel": 5, "lcn_sigma": 1.0, "lcn_threshold": 1.0}
    assert json.dumps(params) == json.dumps(preprocessing_params("gcn-lcn", 1.0, 0.1, 5.0, 1.0, 1.0))
    assert json.dumps(preprocessing_params("gcn-zca", 55, 1)) == json.dumps(preprocessing_params("gcn-zca", 55.0, 1.0))
    for args in (("gcn", float("nan"), 0.1), ("gcn-zca", 55.0, float("inf")), ("gcn-lcn", 1.0, 0.1, 7, float("nan")),
                 ("gcn-lcn", 1.0, 0.1, 7, 2.0, float("inf"))):
        with pytest.raises(ConfigError, match="must be finite"):
            preprocessing_params(*args)
    assert preprocessing_params("gcn", 55.0, float("nan")) == {"name": "gcn", "gcn_scale": 55.0}  # not gcn's option
