"""Making the training forward pass fast without changing the algorithm: torch.compile, bf16 autocast,
channels-last memory format.

``training_forward(model, ...)`` returns the function a training step calls instead of ``model(x)``:

- ``channels_last``: the model's 4-d parameters and buffers, and each input batch, are stored NHWC,
  the layout tensor-core convolutions prefer. Values are unchanged.
- ``amp="bf16"``: the forward pass runs under ``torch.autocast(dtype=torch.bfloat16)``. The binary
  weights ``+-H`` are exact in bfloat16 (for H a power of two), so binarized layers lose nothing in
  the weights (the layers write them in bfloat16 directly: ``layers._autocast_dtype``); activations are
  rounded to 8 bits of mantissa (batch norm outputs bfloat16 for bfloat16
  inputs; its parameters and running statistics stay float32), and the output is cast back to float32
  for the loss. The latent weights, the optimizer state and the updates stay float32: BinaryConnect
  needs the small real-valued updates to accumulate.
- ``compile=True``: ``torch.compile`` of the forward pass, and through AOTAutograd the backward pass,
  so the binarization (``binarize.binarize_ste``: compare, select, the straight-through identity)
  is fused into the kernels around it rather than run as separate passes over the weights.
  ``torch.rand`` with an explicit ``torch.Generator`` breaks Dynamo's graph (torch 2.14), so compiled
  stochastic layers draw from PyTorch's global generator (seeded by ``fit`` from ``--seed``), which
  Inductor generates inside the fused kernel; eager runs keep the dedicated generator. The
  distribution of the binary weights (eq. 2) is the same; the stream of random numbers is not.
- ``compile_mode``: ``torch.compile``'s mode. ``reduce-overhead`` also records the compiled forward and
  backward passes as CUDA graphs on a GPU, which removes the per-kernel launch cost that bounds small
  networks such as the MNIST MLP (on the CPU it compiles as ``default``).

The model itself is left usable as before (``state_dict`` keys unchanged, evaluation in eager mode).
"""

from __future__ import annotations

import platform
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError
from .layers import set_generator

#: Names accepted for ``amp``.
AMP_MODES = ("none", "bf16")
#: ``torch.compile`` modes accepted for ``compile_mode``; the two with CUDA graphs replay the compiled
#: forward and backward passes as graphs on a GPU (one launch each instead of one per kernel).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_amp(amp: str) -> str:
    """Return ``amp`` if it is one of ``AMP_MODES``, else raise a ConfigError."""
    if amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    return amp


def cpu_bf16_hint(model: nn.Module, device: torch.device, amp: str) -> str | None:
    """A one-line suggestion for a convolutional network trained in float32 on an x86 CPU with bfloat16
    instructions (AVX512-BF16 or AMX: ``cpu_computes_bf16``), where ``amp="bf16"`` about halved the training
    step (BENCHMARKS.md, "bf16 autocast and channels-last on the CPU"); None on another device, with ``amp``
    already set, for a network without convolutions (the MLP gains less), and on a CPU without those
    instructions, where bfloat16 is emulated."""
    if device.type != "cpu" or amp != "none" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return None
    if not cpu_computes_bf16():
        return None
    return ("hint: this CPU computes bfloat16 natively: --amp bf16 --channels-last trained the CIFAR-10 convnet "
            "about 2x faster per step on a 2-vCPU AMD EPYC (BENCHMARKS.md); activations are rounded to bfloat16, "
            "latent weights and updates stay float32")


def cpu_bf16_emulated_warning(device: torch.device, amp: str) -> str | None:
    """A warning for ``amp="bf16"`` on an x86 CPU without bfloat16 instructions (``cpu_computes_bf16`` false),
    where oneDNN emulates bfloat16 and the training step is many times slower than in float32 (BENCHMARKS.md,
    "bf16 autocast on a CPU without bf16 instructions"); None on another device, without ``amp``, on a CPU with
    those instructions, and on another architecture (not measured there)."""
    if device.type != "cpu" or amp != "bf16" or not _x86():
        return None
    if cpu_computes_bf16():
        return None
    return ("--amp bf16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 is emulated here, "
            "which made the training step 20x slower than float32 for the CIFAR-10 convnet and 27x for the MNIST "
            "MLP on a 2-vCPU AVX2 AMD EPYC (BENCHMARKS.md); leave out --amp bf16 on this machine")


def _x86() -> bool:
    """Whether this machine is x86-64 (Linux's name, or Windows')."""
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_computes_bf16() -> bool:
    """Whether this is an x86 CPU with bfloat16 instructions: AVX512-BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4
    and later) or AMX. Not oneDNN's ``_is_mkldnn_bf16_supported``, which is also true where oneDNN emulates
    bfloat16 with AVX-512 (Skylake to Ice Lake). Other architectures: False (not measured here)."""
    if not _x86():
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)  # private to torch.cpu (torch 2.14); absent: not known
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            pass
    return False


def check_compile_mode(mode: str) -> str:
    """Return ``mode`` if it is one of ``COMPILE_MODES``, else raise a ConfigError."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def training_forward(
    model: nn.Module, amp: str = "none", channels_last: bool = False, compile: bool = False,
    compile_mode: str = "default", autocast_cache: bool = True,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``x -> float32 output of model(x)`` with the chosen speed options (see the module).

    ``channels_last`` converts ``model`` in place; ``compile`` detaches stochastic layers from their
    dedicated generator (see the module docstring). ``compile_mode`` is ``torch.compile``'s ``mode``;
    with CUDA graphs (``reduce-overhead``, ``max-autotune``) each call starts a new step of the graph
    trees (``torch.compiler.cudagraph_mark_step_begin``): the previous step's output must be used before
    the next call, as a training step does. ``autocast_cache=False`` turns off autocast's weight-cast
    cache, as recording the step as a CUDA graph requires (``cudagraph.py``). Call after the model is on
    its device.
    """
    check_amp(amp)
    check_compile_mode(compile_mode)
    param = next(model.parameters(), None)
    device_type = param.device.type if param is not None else "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp == "bf16", cache_enabled=autocast_cache):
            out = model(x)
        return out.float()

    if not compile:
        return forward
    set_generator(model, None)
    compiled = torch.compile(forward, mode=None if compile_mode == "default" else compile_mode)
    if compile_mode not in CUDA_GRAPH_MODES:
        return compiled

    def graph_step(x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)

    return graph_step
