"""Binarization of weights: the heart of BinaryConnect.

Courbariaux, Bengio & David, "BinaryConnect: Training Deep Neural Networks with binary weights
during propagations", NIPS 2015 (arXiv:1511.00363), section 2.

Pure functions first (``hard_sigmoid``, ``binarize_deterministic``, ``binarize_stochastic``), then the
straight-through estimator (``binarize_ste``) that the layers call, then a small registry that turns
the names used in configuration (``"deterministic"``, ``"stochastic"``, ``"none"``) into objects.
"""

from __future__ import annotations

import torch

#: Names accepted wherever a binarization is chosen by string.
BINARIZATIONS = ("deterministic", "stochastic", "none")
#: Straight-through estimator variants: the paper's identity, or larq-style cancelling for |W| > H.
STE_VARIANTS = ("identity", "clipped")


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The paper's hard sigmoid, eq. (3): ``sigma(x) = clip((x + 1) / 2, 0, 1)``."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def plus_minus(condition: torch.Tensor, H: float, dtype: torch.dtype, out_dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """``+H`` where ``condition`` (a bool tensor) holds, else ``-H``, in ``dtype``; with ``out_dtype``, those
    values converted to ``out_dtype`` (what autocast's cast of them would give).

    Computed as ``condition * 2H - H``, exact (``2H - H = H`` by Sterbenz's lemma, ``0 * 2H - H = -H``)
    and H as ``dtype`` represents it. On a GPU with float32 weights (what training uses) as one
    ``torch.where`` kernel instead of three; on the CPU ``torch.where`` with two scalars is not
    vectorized (about 4 ns per element on one core, against 1.3 for the arithmetic). On a GPU with
    another ``out_dtype`` (bfloat16 under autocast), also one ``torch.where``, on the two values held as
    0-dim tensors of the device (``_signed_H``): written once in ``out_dtype`` instead of in ``dtype`` and
    then cast.
    """
    if out_dtype is not None and out_dtype != dtype:
        if condition.device.type != "cpu":
            pair = _signed_H(condition.device, H, dtype, out_dtype)
            if pair is not None:
                return torch.where(condition, *pair)
        return plus_minus(condition, H, dtype).to(out_dtype)
    if condition.device.type != "cpu" and dtype == torch.float32:
        return torch.where(condition, H, -H).to(dtype)  # no copy when the default dtype is float32
    return condition.to(dtype).mul_(2.0 * H).sub_(H)


_SIGNED_H: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _signed_H(device: torch.device, H: float, dtype: torch.dtype, out_dtype: torch.dtype):
    """``(+H, -H)``, H as ``dtype`` represents it converted to ``out_dtype``, as 0-dim tensors on ``device``,
    made once per process (a fill kernel, no copy from the host, waited for). None while a CUDA graph is being
    recorded and they are not made yet: made inside the recording, they would hold their values only once
    the graph is replayed."""
    key = (device, float(H), dtype, out_dtype)
    pair = _SIGNED_H.get(key)
    if pair is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        h = torch.full((), H, dtype=dtype, device=device).to(out_dtype)
        pair = (h, -h)
        if device.type == "cuda":  # filled on this stream: done before any other stream reads them
            torch.cuda.current_stream(device).synchronize()
        _SIGNED_H[key] = pair
    return pair


def binarize_deterministic(w: torch.Tensor, H: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eq. (1): ``Wb = +H if W >= 0 else -H``. Zero maps to +H (unlike ``torch.sign``). ``out_dtype``: the
    result converted to it (default: W's dtype)."""
    return plus_minus(w >= 0, H, w.dtype, out_dtype)


def binarize_stochastic(
    w: torch.Tensor, H: float = 1.0, generator: torch.Generator | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Eq. (2): ``Wb = +H with probability p = hard_sigmoid(W / H), else -H``.

    ``u ~ U[0, 1)`` is drawn from ``generator`` (same device as ``w``), and ``Wb = +H`` where ``u < p``:
    so ``P(Wb = +H) = p`` exactly, ``W >= H`` always gives ``+H`` and ``W <= -H`` always gives ``-H``.
    ``out_dtype``: the result converted to it (default: W's dtype).
    """
    p, u = _probability_and_uniforms(w, H, generator)
    return plus_minus(u < p, H, w.dtype, out_dtype)


def _probability_and_uniforms(w: torch.Tensor, H: float, generator: torch.Generator | None):
    """``(p, u)`` of eq. (2): ``p = (W / H + 1) / 2`` in W's dtype, and ``u ~ U[0, 1)`` (float32) from
    ``generator``. ``u < hard_sigmoid(x)`` is ``u < (x + 1) / 2`` for u in [0, 1): the clip changes no
    comparison, so it is skipped.

    ``p`` is computed as ``0.5 - (-0.5) * q`` (``torch.rsub``), ``q = W / H`` (``W`` itself for H = 1, which
    dividing would not change): one pass over the weights instead of three. Bit for bit
    ``(q + 1) * 0.5``: ``0.5 * q`` is exact (or, for subnormal q, far below half an ulp of the sum), so both
    round the exact ``(q + 1) / 2`` once (halving is exact). Checked on 40 M float32 values (random bit
    patterns, a sweep of [-1.5, 1.5], infinities, zeros, subnormals) and every bfloat16 and float16 value."""
    q = w.detach() if H == 1.0 else w.detach() / H
    p = torch.rsub(q, 0.5, alpha=-0.5)
    return p, torch.rand(w.shape, generator=generator, device=w.device, dtype=torch.float32)


def _binarize_cpu(w: torch.Tensor, mode: str, H: float, generator: torch.Generator | None) -> torch.Tensor:
    """The training forward's binarization on the CPU: the binary weights of ``binarize_deterministic`` /
    ``binarize_stochastic``, bit for bit (NaN weights aside), in fewer passes over the weights and fewer new
    tensors (``out=`` kernels, which ``torch.func`` transforms do not take: the public functions above
    keep the portable form). BENCHMARKS.md has the timings.

    - deterministic: ``copysign(H, W + 0)``, two passes and one new tensor instead of four and two; adding
      +0 turns -0.0 into +0.0 (IEEE 754 round-to-nearest), so every zero gets +H;
    - stochastic (float32): ``-copysign(H, u - p)`` in the uniform numbers' memory: ``u - p < 0`` exactly
      where ``u < p`` (two different floats never subtract to zero, and ``u == p`` gives +0.0, so -H).
    A NaN weight (a diverged run: training stops at its NaN loss) gets the sign its NaN carries."""
    if mode == "deterministic":
        out = w.detach() + 0.0
        return torch.copysign(torch.tensor(H, dtype=w.dtype), out, out=out)
    if w.dtype != torch.float32:
        return binarize_stochastic(w, H, generator)
    p, u = _probability_and_uniforms(w, H, generator)
    return torch.copysign(torch.tensor(H, dtype=torch.float32), u.sub_(p), out=u).neg_()


def binarize_ste(
    w: torch.Tensor,
    mode: str = "deterministic",
    H: float = 1.0,
    ste: str = "identity",
    generator: torch.Generator | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Binarize ``w`` for the forward pass and pass the gradient straight through (Algorithm 1).

    Forward: ``Wb = binarize(W)`` with the chosen ``mode`` (``"none"`` returns ``w`` itself).
    Backward: the gradient with respect to ``Wb`` is applied to the latent ``W`` unchanged
    (``ste="identity"``, the paper), or zeroed where ``|W| > H`` (``ste="clipped"``), in W's dtype.
    ``out_dtype`` (the layers pass autocast's dtype under autocast): ``Wb`` in that dtype, the values
    autocast's cast of the W-dtype ``Wb`` would give, written once on a GPU instead of written and cast.
    """
    if mode == "none":
        return w
    if mode not in ("deterministic", "stochastic"):
        raise ValueError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZATIONS)}")
    if ste not in STE_VARIANTS:
        raise ValueError(f"unknown straight-through estimator {ste!r}; choose one of {', '.join(STE_VARIANTS)}")
    if torch.compiler.is_compiling():  # True while Dynamo traces (torch >= 2.3, this project's floor)
        return _straight_through_traced(w, mode, float(H), ste, generator, out_dtype)
    return _StraightThrough.apply(w, mode, float(H), ste, generator, out_dtype)


def _straight_through_traced(w, mode, H, ste, generator, out_dtype=None):
    """The straight-through estimator for torch.compile, as ``Wb + (W' - W'.detach())`` with ``W' = W``
    (identity) or ``W * 1[|W| <= H]`` (clipped): forward value ``Wb + 0 = Wb`` exactly (``x - x = 0`` for
    finite x), gradient to W the incoming one, unchanged or zeroed where ``|W| > H``. Under Inductor the
    extra operations fuse into the binarization kernel. Used instead of ``_StraightThrough`` when
    compiling because torch 2.11's Dynamo traces that Function into a zero gradient for W (measured with
    torch 2.11.0, CPU and CUDA; 2.13 and 2.14 are right), which trains only the biases and batch norms."""
    with torch.no_grad():
        wb = binarize_deterministic(w, H) if mode == "deterministic" else binarize_stochastic(w, H, generator)
    through = w if ste == "identity" else w * (w.detach().abs() <= H).to(w.dtype)
    out = wb + (through - through.detach())
    return out if out_dtype is None or out_dtype == out.dtype else out.to(out_dtype)  # (fused by Inductor)


class _StraightThrough(torch.autograd.Function):
    """Forward: the binary weights, exactly +-H. Backward: the incoming gradient, unchanged (identity) or
    zeroed where ``|W| > H`` (clipped). A Function rather than the ``wb + (w - w.detach())`` idiom: that
    costs two more full passes over the weights in every forward (about 15% of a CPU training step of the
    MNIST MLP). Under torch.compile, ``binarize_ste`` uses ``_straight_through_traced`` instead."""

    @staticmethod
    def forward(ctx, w, mode, H, ste, generator, out_dtype):  # runs without autograd: w is not tracked here
        if w.device.type == "cpu":
            wb = _binarize_cpu(w, mode, H, generator)
            if out_dtype is not None and out_dtype != wb.dtype:
                wb = wb.to(out_dtype)
        elif mode == "deterministic":
            wb = binarize_deterministic(w, H, out_dtype)
        else:
            wb = binarize_stochastic(w, H, generator, out_dtype)
        ctx.ste, ctx.H, ctx.dtype = ste, H, w.dtype
        if ste == "clipped":
            ctx.save_for_backward(w)
        return wb

    @staticmethod
    def backward(ctx, grad):
        if ctx.ste == "clipped":
            (w,) = ctx.saved_tensors
            grad = grad * (w.abs() <= ctx.H).to(grad.dtype)
        return grad.to(ctx.dtype), None, None, None, None, None


def check_binarization(mode: str) -> str:
    """Return ``mode`` if it names a binarization, else raise a ValueError listing the known ones."""
    if mode not in BINARIZATIONS:
        raise ValueError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZATIONS)}")
    return mode


def check_ste(ste: str) -> str:
    """Return ``ste`` if it names a straight-through estimator, else raise a ValueError."""
    if ste not in STE_VARIANTS:
        raise ValueError(f"unknown straight-through estimator {ste!r}; choose one of {', '.join(STE_VARIANTS)}")
    return ste
