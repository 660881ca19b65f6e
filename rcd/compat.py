"""Differences between transformers versions, in one place.

transformers 5.x renamed a causal LM's ``past_key_values`` argument and output field to ``cache`` (the
old name warns on every forward and goes away in 5.40); older versions only know ``past_key_values``.
"""
from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_arg(cls) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{<the model's cache argument>: cache}`` for ``model(...)``."""
    return {_cache_arg(type(model)): cache}


def cache_layers(cache) -> list:
    """(keys, values) [B, kv_heads, T, head_dim] of every layer of a transformers cache (any version)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` or ``out.past_key_values``)."""
    c = getattr(out, "cache", None) if "cache" in getattr(out, "__dataclass_fields__", {}) else None
    return c if c is not None else out.past_key_values
