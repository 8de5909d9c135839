"""The whole training step recorded as CUDA graphs (``--cuda-graph``): one launch per graph instead of one
per kernel.

A training step of the paper's MNIST MLP runs a few dozen small kernels (forward, loss, backward, one fused
Adam per learning-rate group, the clipping), each far shorter than the host needs to launch it: the GPU
waits on Python. ``torch.compile(mode="reduce-overhead")`` graphs the forward and backward passes only.
``GraphedStep`` records the rest too, as two graphs replayed every step:

1. ``forward_backward``: forward pass, square hinge loss, backward pass (gradients written into the
   parameters' ``.grad``, the loss into a static tensor);
2. ``step``: the Adam step of every parameter group and the clipping of the latent weights to [-H, H]
   (the optimizer's post-step hook, recorded with it), each group's on a stream of its own
   (``optim.step_groups_concurrently``): parallel branches of the graph, since each group's fused Adam
   kernel alone fills a fraction of the GPU. ``concurrent_groups=False`` records them one after the other.

Between the two the host reads nothing from the device, so the training loop keeps its NaN guard: the
loss of each step is copied into the guard's window, checked before the optimizer step of the window's
last step, as without graphs. The algorithm is unchanged: same layers, same binarization, same updates.

What recording needs, and how it is kept exact:

- The batch lives in static input tensors; each step gathers its examples into them (``load``).
- Adam is recorded with ``capturable=True`` and each group's learning rate is a 0-dim tensor on the device,
  so that ``optim.set_lr`` changes the rate the recorded kernels read (``fill_``) instead of a number
  baked into the graph. The checkpoint stores it as a number, as before. On a GPU that tensor is float32
  (fused Adam's CUDA kernel reads a tensor learning rate as float; a number it takes as a double), so a
  graphed GPU step can differ from the eager one in the last bit of an update; on the CPU, float64 keeps
  the two identical.
- Recording needs a few eager warm-up steps first (on a side stream: cuBLAS/cuDNN workspaces, autotuning,
  ``torch.compile``'s compilation, Adam's lazily created state). They are taken back before recording:
  the parameters, buffers (batch-norm statistics), optimizer state and random generators are restored
  to what they were, so the run trains exactly the steps the schedule says. (Adam's state is created
  by the warm-up; where there was none yet, it is zeroed, which is what a fresh Adam state is.)
- Stochastic BinaryConnect draws its binary weights inside the graph. The dedicated binarization
  generator is registered with the graph, and PyTorch's default CUDA generator (used by compiled layers)
  is registered by PyTorch itself: each replay draws fresh numbers and advances the generator as the
  eager step would (checkpoints save the states of both).
- Autocast (``--amp bf16``) runs without its weight-cast cache, as CUDA graph capture requires.

``capture=False`` runs the same static-buffer step eagerly, warm-up and restore included; the tests use
it to check the machinery on a CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .errors import ConfigError, CudaGraphError
from .optim import step_groups_concurrently


def tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make each group's ``lr`` a 0-dim tensor on ``device``, in place: float32 on a GPU (what fused Adam's
    kernel reads there), float64 on the CPU (where the fused step reads it as a double, as it does a number)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item() if torch.is_tensor(lr) else lr)
        group["lr"] = torch.tensor(value, dtype=dtype, device=device)


def register_generator(graph, generator: torch.Generator) -> None:
    """``graph.register_generator_state(generator)``: needed before recording where PyTorch registers only
    its default generator (torch 2.11, the version on the project's GPU machine, and 2.12); 2.14 (and, by
    PyTorch's sources, 2.13) registers every generator a recorded kernel draws from on its first use and
    keeps the method as a no-op that warns of its deprecation. The call stays for the former, without that
    warning for the latter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*register_generator_state\(\) is deprecated")
        graph.register_generator_state(generator)


def check_recordable(model: nn.Module) -> None:
    """Refuse, with a ConfigError, a model whose training step cannot be recorded as a CUDA graph: a batch
    norm with ``momentum=None`` (a cumulative average) reads ``num_batches_tracked`` back to the host at every
    step, which recording forbids. (None of the recipes' models has one; a model built through the API may.)"""
    cumulative = [name for name, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum is None]
    if cumulative:
        raise ConfigError(f"batch norm with momentum=None (a cumulative average) cannot be recorded as a CUDA graph: "
                          f"{', '.join(cumulative)}; give it a momentum, or train without --cuda-graph")


class GraphedStep:
    """One training step as two CUDA graphs (see the module docstring).

    ``loss_fn(x, y) -> loss`` is the forward pass and the loss (``x``, ``y``: a batch like ``sample_x``,
    ``sample_y``); ``optimizer`` is ``optim.make_optimizer``'s Adam over ``model``'s parameters, its
    state already restored when resuming. ``generators`` are the generators the forward pass draws from
    (the CUDA ones are registered with the graph). Build it after the model, optimizer and generators
    are in their final state: the warm-up is taken back, and the recording keeps pointers to the
    parameters, gradients, optimizer state and learning rates, so these must be updated in place
    afterwards (``load_state_dict`` of the model is, ``optim.set_lr`` is). Replay with the training device
    as the current CUDA device (``torch.cuda.device``), as it is while recording. ``concurrent_groups``
    (default) steps the optimizer's parameter groups side by side (``optim.step_groups_concurrently``);
    False, one after the other (``optimizer.step()``), the same values either way.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module,
                 optimizer: torch.optim.Optimizer, sample_x: torch.Tensor, sample_y: torch.Tensor,
                 generators: Iterable[torch.Generator] = (), capture: bool = True, warmup_steps: int = 3,
                 concurrent_groups: bool = True) -> None:
        device = sample_x.device
        if capture and device.type != "cuda":
            raise ConfigError(f"CUDA graphs (--cuda-graph) need a CUDA device; the training device is {device}")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        if capture:
            check_recordable(model)
        self.loss_fn, self.model, self.optimizer, self.capture = loss_fn, model, optimizer, capture
        self._optimizer_step = (lambda: step_groups_concurrently(optimizer)) if concurrent_groups else optimizer.step
        self.device = device
        self.generators = list(generators)
        self.x = sample_x.detach().clone()
        self.y = sample_y.detach().clone()
        self.loss = torch.zeros((), device=device)
        tensor_learning_rates(optimizer, device)
        for group in optimizer.param_groups:
            # fused Adam keeps its step counts on the device anyway: the flag only matters when recording
            # (set there, which spares the warm-up a warning); the multi-tensor one needs them there first
            group["capturable"] = capture and not group.get("fused")

        self._forward_backward_graph = self._step_graph = None
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            saved = self._snapshot()
            self._warm_up(warmup_steps)
            self._restore(saved)
            if capture:
                self._record()

    # --- the two steps ---
    def load(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Copy a batch into the static inputs (same shape and dtype as the sample batch)."""
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"a recorded step takes batches of shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.y.copy_(y)

    def gather(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
               transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
               generator: torch.Generator | None = None) -> None:
        """``load(x[index], y[index])``, ``x[index]`` through ``transform(., generator)`` if given (data
        augmentation, run eagerly); without one, gathered straight into the static inputs."""
        if transform is not None:
            self.load(transform(x[index], generator), y[index])
            return
        torch.index_select(x, 0, index, out=self.x)
        torch.index_select(y, 0, index, out=self.y)

    def forward_backward(self) -> torch.Tensor:
        """Forward pass, loss and backward pass on the loaded batch; returns the (static) loss tensor."""
        if self._forward_backward_graph is not None:
            self._forward_backward_graph.replay()
        else:
            self.loss = self._eager_forward_backward()
        return self.loss

    def step(self) -> None:
        """The optimizer step (Adam, then the clipping of the latent weights)."""
        if self._step_graph is not None:
            self._step_graph.replay()
        else:
            self._optimizer_step()

    # --- building ---
    def _eager_forward_backward(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.x, self.y)
        loss.backward()
        return loss.detach()

    def _tensors(self) -> list[torch.Tensor]:
        return list(itertools.chain(self.model.parameters(), self.model.buffers()))

    def _snapshot(self) -> dict:
        state = {p: {k: v.detach().clone() for k, v in s.items() if torch.is_tensor(v)}
                 for p, s in self.optimizer.state.items()}
        rng = {"cpu": torch.get_rng_state(), "generators": [g.get_state() for g in self.generators]}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"tensors": [t.detach().clone() for t in self._tensors()], "optimizer": state, "rng": rng}

    @torch.no_grad()
    def _restore(self, saved: dict) -> None:
        for t, value in zip(self._tensors(), saved["tensors"], strict=True):
            t.copy_(value)
        for param, values in self.optimizer.state.items():
            before = saved["optimizer"].get(param)
            for key, value in values.items():
                if torch.is_tensor(value):
                    value.copy_(before[key]) if before is not None else value.zero_()
        torch.set_rng_state(saved["rng"]["cpu"])
        for g, s in zip(self.generators, saved["rng"]["generators"], strict=True):
            g.set_state(s)
        if "cuda" in saved["rng"]:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], self.device)
        self.optimizer.zero_grad(set_to_none=True)

    def _warm_up(self, steps: int) -> None:
        side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # CUDA: on a side stream
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for _ in range(steps):
                self._eager_forward_backward()
                self._optimizer_step()
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)

    def _record(self) -> None:
        """Record the two graphs; a failure raises CudaGraphError naming what PyTorch said, the first cause
        included (torch 2.11 reports an error inside the recording as a second error when recording ends,
        "operation failed due to a previous error during capture", with the first one chained to it)."""
        try:
            self._record_graphs()
        except RuntimeError as exc:
            raise CudaGraphError(f"recording the training step as CUDA graphs failed: {_chain(exc)}") from exc

    def _record_graphs(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # the backward pass below allocates the gradients
        stream = torch.cuda.Stream(self.device)  # (torch.cuda.graph's default stream is on the first GPU used)
        forward_backward = torch.cuda.CUDAGraph()
        for g in self.generators:
            if g.device.type == "cuda":
                register_generator(forward_backward, g)
        with torch.cuda.graph(forward_backward, stream=stream):
            loss = self.loss_fn(self.x, self.y)
            loss.backward()
            self.loss = loss.detach()
        for group in self.optimizer.param_groups:
            group["capturable"] = True
        step = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step, stream=stream):
            self._optimizer_step()
        self._forward_backward_graph, self._step_graph = forward_backward, step


def _chain(exc: BaseException) -> str:
    """The first line of ``exc``'s message and of each exception behind it (its cause, or the one it was
    raised while handling), outermost first, joined into one line."""
    lines, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip().splitlines()
        lines.append(f"{type(exc).__name__}: {text[0] if text else '(no message)'}")
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return "; caused by ".join(lines)
