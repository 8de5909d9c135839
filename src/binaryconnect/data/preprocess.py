"""Image preprocessing of the paper: global contrast normalisation, ZCA whitening, local contrast
normalisation. Pure tensor functions on CPU, processed in chunks so that 600k SVHN images fit in memory.

The paper (section 3) preprocesses CIFAR-10 with GCN and ZCA whitening and SVHN with GCN and LCN, as
Goodfellow et al.'s maxout networks did; its original code reads the datasets pylearn2 made:

- CIFAR-10: ``pylearn2/scripts/datasets/make_cifar10_gcn_whitened.py``: ``CIFAR10(gcn=55.)`` (per image:
  subtract the mean over its 3,072 values, scale to L2 norm 55), then ``preprocessing.ZCA()`` (filter bias
  0.1) fitted on the training images.
- SVHN: ``pylearn2/scripts/papers/maxout/svhn_preprocessing.py``: ``GlobalContrastNormalization()``
  (L2 norm 1) then ``LeCunLCN((32, 32))`` (7 x 7 Gaussian window, sigma 2, threshold 1e-4).

  ``gcn-lcn`` is Jarrett et al.'s LCN, per channel. ``gcn-lcn-pylearn2`` is what pylearn2's ``lecun_lcn``
  computes: the divisive step's local norm taken from the input ``x`` instead of the centred ``v``. pylearn2's
  versions also differ among themselves in which channels they normalise: an older ``LeCunLCN`` loops over
  the three channels; a later one returns from inside its channel loop, so only channel 0 (red) is
  normalised. Which version made the paper's SVHN data is not known; ``gcn-lcn-pylearn2`` normalises every
  channel.

A preprocessing is named by a string (``PREPROCESSINGS``) and its numeric options, and
``preprocess_splits`` applies it to train / validation / test with every statistic fitted on the
training split only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError

#: Names accepted by ``preprocess_splits``.
PREPROCESSINGS = ("none", "gcn", "gcn-zca", "gcn-lcn", "gcn-lcn-pylearn2")
_LCN = {"gcn-lcn": "centered", "gcn-lcn-pylearn2": "input"}  # LCN preprocessings: where the local norm comes from

_CHUNK = 4096  # images per chunk: bounds the float64 temporaries to ~100 MB for 32x32x3 images


def global_contrast_normalize(
    x: torch.Tensor,
    scale: float = 55.0,
    sqrt_bias: float = 0.0,
    use_std: bool = False,
    min_divisor: float = 1e-8,
) -> torch.Tensor:
    """Global contrast normalisation, per example over all its features (pylearn2's definition).

    For each example ``x`` (flattened to ``d`` values): ``xc = x - mean(x)``, then
    ``xc / (sqrt(sqrt_bias + sum(xc ** 2)) / scale)`` (``use_std=False``: the L2 norm becomes ``scale``),
    or ``xc / (sqrt(sqrt_bias + var(xc)) / scale)`` with the unbiased variance (``use_std=True``).
    A divisor below ``min_divisor`` (a constant image) is replaced by 1. Computed in float64,
    returned as float32 with the shape of ``x``.
    """
    if not scale > 0:
        raise ConfigError(f"gcn scale must be positive, got {scale}")
    out = torch.empty(x.shape, dtype=torch.float32)
    flat_out = out.view(len(x), -1)
    for i in range(0, len(x), _CHUNK):
        xc = x[i : i + _CHUNK].reshape(min(_CHUNK, len(x) - i), -1).double()
        xc = xc - xc.mean(dim=1, keepdim=True)
        if use_std:
            spread = xc.var(dim=1, correction=1 if xc.shape[1] > 1 else 0, keepdim=True)
        else:
            spread = xc.square().sum(dim=1, keepdim=True)
        divisor = (sqrt_bias + spread).sqrt() / scale
        divisor = torch.where(divisor < min_divisor, torch.ones_like(divisor), divisor)
        flat_out[i : i + _CHUNK] = xc / divisor
    return out


class ZCA:
    """ZCA whitening (zero-phase component analysis), fitted on training data only.

    With ``X`` the ``N x d`` training matrix, ``mu`` its column means and ``C = (X - mu)^T (X - mu) / N``
    its (biased) covariance with eigendecomposition ``C = V diag(lambda) V^T``:

        ``P = V diag(1 / sqrt(lambda + filter_bias)) V^T``,   ``zca(x) = (x - mu) P``.

    The whitened training data has covariance ``V diag(lambda / (lambda + filter_bias)) V^T``: the
    identity when ``filter_bias = 0`` (and ``C`` is full rank). pylearn2's ``ZCA`` (used by the paper's
    code) has ``filter_bias = 0.1``; the bias keeps the directions of near-zero variance (GCN removes one
    exactly, the mean; JPEG removes high frequencies) from being amplified without bound.
    Fitted in float64; ``apply`` computes in float32 unless told otherwise.
    """

    def __init__(self, filter_bias: float = 0.1) -> None:
        if not filter_bias >= 0:
            raise ConfigError(f"zca filter bias must be >= 0, got {filter_bias}")
        self.filter_bias = float(filter_bias)
        self.mean: torch.Tensor | None = None
        self.matrix: torch.Tensor | None = None
        self.eigenvalues: torch.Tensor | None = None

    def fit(self, x: torch.Tensor) -> ZCA:
        """Estimate ``mu`` and ``P`` from the examples ``x`` (any shape ``(N, ...)``)."""
        n = len(x)
        if n < 2:
            raise ConfigError(f"ZCA needs at least 2 training examples, got {n}")
        flat = x.reshape(n, -1)
        d = flat.shape[1]
        mean = flat.double().mean(dim=0)
        if n <= d:  # fewer examples than features: C has rank < n, its other eigenvalues are exactly 0
            return self._fit_low_rank(flat.double() - mean, mean)
        cov = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, n, _CHUNK):
            xc = flat[i : i + _CHUNK].double() - mean
            cov.addmm_(xc.T, xc)
        cov /= n
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp_min(0.0)  # round-off can make the smallest slightly negative
        # numerical rank as in numpy.linalg.matrix_rank: eigenvalues below d * eps * max are round-off zeros
        tolerance = eigenvalues.max() * d * torch.finfo(torch.float64).eps
        if self.filter_bias == 0 and eigenvalues.min() <= tolerance:
            raise ConfigError(f"ZCA with filter_bias 0 on a rank-deficient covariance (smallest eigenvalue "
                              f"{eigenvalues.min().item():.3g} of {eigenvalues.max().item():.3g}; GCN removes one "
                              "direction exactly): use a positive filter bias")
        scale = (eigenvalues + self.filter_bias).rsqrt()
        self.mean = mean
        self.matrix = (eigenvectors * scale) @ eigenvectors.T
        self.eigenvalues = eigenvalues
        return self

    def _fit_low_rank(self, centered: torch.Tensor, mean: torch.Tensor) -> ZCA:
        """The same ``P`` from the SVD ``Xc = U S V_r^T`` (``O(n^2 d)`` instead of ``O(d^3)``): with
        ``lambda = S^2 / n`` and ``1/sqrt(b)`` on the null space of ``C``,
        ``P = I / sqrt(b) + V_r diag(1/sqrt(lambda + b) - 1/sqrt(b)) V_r^T``."""
        n, d = centered.shape
        if self.filter_bias == 0:
            raise ConfigError(f"ZCA with filter_bias 0 on {n} examples of {d} features (a rank-deficient "
                              "covariance): use a positive filter bias")
        _, s, vh = torch.linalg.svd(centered, full_matrices=False)
        lam = s.square() / n
        base = self.filter_bias ** -0.5
        self.mean = mean
        self.matrix = (vh.T * ((lam + self.filter_bias).rsqrt() - base)) @ vh
        self.matrix.diagonal().add_(base)
        self.eigenvalues = torch.cat([torch.zeros(d - len(lam), dtype=torch.float64), lam.flip(0)])
        return self

    def apply(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(x - mu) P`` for every example of ``x``, in ``dtype``, with the shape of ``x``."""
        if self.matrix is None or self.mean is None:
            raise RuntimeError("ZCA.apply called before fit")
        n = len(x)
        flat = x.reshape(n, -1)
        mean, matrix = self.mean.to(dtype), self.matrix.to(dtype)
        out = torch.empty(flat.shape, dtype=dtype)
        for i in range(0, n, _CHUNK):
            out[i : i + _CHUNK] = (flat[i : i + _CHUNK].to(dtype) - mean) @ matrix
        return out.view(x.shape)


def gaussian_window(kernel_size: int = 7, sigma: float = 2.0) -> torch.Tensor:
    """``kernel_size x kernel_size`` Gaussian of standard deviation ``sigma``, centred, summing to 1
    (pylearn2's ``gaussian_filter``), float64."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ConfigError(f"LCN kernel size must be odd and positive, got {kernel_size}")
    r = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma**2))
    return g / g.sum()


def local_contrast_normalize(
    x: torch.Tensor, kernel_size: int = 7, sigma: float = 2.0, threshold: float = 1e-4,
    out: torch.Tensor | None = None, norm_of: str = "centered",
) -> torch.Tensor:
    """Local contrast normalisation (Jarrett, Kavukcuoglu, Ranzato & LeCun, ICCV 2009), per channel.

    With ``G`` the Gaussian window (``gaussian_window``) applied as a zero-padded "same" convolution
    to each channel of each image ``x``:

        ``v = x - G * x``   (subtractive),   ``s = sqrt(G * v ** 2)``,
        ``y = v / max(mean(s), s, threshold)``   (divisive; ``mean`` over the image's pixels).

    Jarrett et al.'s definition. ``norm_of="input"`` computes ``s = sqrt(G * x ** 2)`` instead, as
    pylearn2's ``lecun_lcn`` (the paper's SVHN data) does. Input ``(N, C, H, W)``; float32 result, written
    into ``out`` when given (``out=x`` works in place: each chunk is read before written).
    """
    if norm_of not in ("centered", "input"):
        raise ConfigError(f"LCN norm_of must be 'centered' or 'input', got {norm_of!r}")
    if x.dim() != 4:
        raise ConfigError(f"LCN expects images (N, C, H, W), got shape {tuple(x.shape)}")
    window = gaussian_window(kernel_size, sigma).to(torch.float64)[None, None]
    pad = kernel_size // 2
    n, c, h, w = x.shape
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    for i in range(0, n, _CHUNK):
        xb = x[i : i + _CHUNK].double().reshape(-1, 1, h, w)
        v = xb - F.conv2d(xb, window, padding=pad)
        s = F.conv2d((v if norm_of == "centered" else xb).square(), window, padding=pad).sqrt()
        divisor = torch.maximum(s, s.mean(dim=(2, 3), keepdim=True)).clamp_min(threshold)
        out[i : i + _CHUNK] = (v / divisor).reshape(-1, c, h, w)
    return out


def scale_to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (0..255) to float32 in [-1, 1]: ``x / 127.5 - 1``."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def check_preprocessing(name: str) -> str:
    """Return ``name`` if it names a preprocessing, else raise a ConfigError listing the known ones."""
    if name not in PREPROCESSINGS:
        raise ConfigError(f"unknown preprocessing {name!r}; choose one of {', '.join(PREPROCESSINGS)}")
    return name


def preprocess_splits(
    train: torch.Tensor,
    others: list[torch.Tensor],
    name: str,
    gcn_scale: float = 55.0,
    zca_bias: float = 0.1,
    lcn_kernel: int = 7,
    lcn_sigma: float = 2.0,
    lcn_threshold: float = 1e-4,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Preprocess uint8 images ``(N, C, H, W)``: ``train`` and each of ``others`` (validation, test).

    - ``none``: pixels scaled to [-1, 1];
    - ``gcn``: ``global_contrast_normalize(scale=gcn_scale)`` on 0..255 pixels;
    - ``gcn-zca``: GCN, then ``ZCA(zca_bias)`` fitted on ``train`` only and applied to all;
    - ``gcn-lcn``: GCN, then ``local_contrast_normalize``; ``gcn-lcn-pylearn2``: the same with
      ``norm_of="input"``.

    GCN and LCN are per-example maps; only ZCA has statistics, and they come from ``train`` only.
    """
    check_preprocessing(name)
    if name == "none":
        return scale_to_unit_range(train), [scale_to_unit_range(o) for o in others]
    gcn = [global_contrast_normalize(t, scale=gcn_scale) for t in [train, *others]]
    if name == "gcn":
        return gcn[0], gcn[1:]
    if name in _LCN:  # in place: SVHN train + extra is 7.4 GB per float32 copy
        lcn = [local_contrast_normalize(t, lcn_kernel, lcn_sigma, lcn_threshold, out=t, norm_of=_LCN[name])
               for t in gcn]
        return lcn[0], lcn[1:]
    zca = ZCA(zca_bias).fit(gcn[0])
    return zca.apply(gcn[0]), [zca.apply(t) for t in gcn[1:]]


def preprocessing_params(name: str, gcn_scale: float, zca_bias: float, lcn_kernel: int = 7,
                         lcn_sigma: float = 2.0, lcn_threshold: float = 1e-4) -> dict:
    """The options that change the output of ``preprocess_splits(name, ...)``: a cache key component."""
    params: dict = {"name": check_preprocessing(name)}
    if name != "none":
        params["gcn_scale"] = float(gcn_scale)
    if name == "gcn-zca":
        params["zca_bias"] = float(zca_bias)
    if name in _LCN:
        params.update(lcn_kernel=int(lcn_kernel), lcn_sigma=float(lcn_sigma), lcn_threshold=float(lcn_threshold))
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"preprocessing option {key} must be finite, got {value}")
    return params
