"""Model registry: a name in configuration becomes a network through ``create_model``.

``create_model("mlp", binarization="stochastic")`` builds the paper's permutation-invariant MNIST MLP.
An unknown name raises a ValueError that lists the registered ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register a model factory under ``name`` (snake_case)."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with ``kwargs``; raise a clear error on an unknown name."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    signature = inspect.signature(factory)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for model {name!r}: {exc}") from None
    passes_on = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    try:
        return factory(**kwargs)
    except TypeError as exc:  # options passed on (``**kwargs``) are checked only by what they are passed to;
        if not passes_on:  # otherwise an error inside the factory is its own, with its traceback
            raise
        raise ValueError(f"bad options for model {name!r}: {exc}") from exc


from . import convnet, mlp  # noqa: E402,F401  (registers the models)
