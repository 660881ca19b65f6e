"""Selective recompute of spliced chunk KV (CacheBlend, Yao et al., 2024), training-free and generic.

Chunk KV caches computed alone (``latent_kv``, ``lazy_kv``) and spliced one after another never
attend to each other. CacheBlend repairs most of the difference by recomputing the KV of the few
tokens whose cached KV deviates most from a full prefill. Here, for one row's spliced chunks
(tokens x_0..x_{L-1} at positions 0..L-1, keys re-rotated to those positions):

1. **Select.** A partial forward of x over blocks 0..s (``select_layer`` s; stopped after block s,
   cost ≈ (s+1)/n_layers of a prefill) gives the full-context keys and values K*, V* of layer s.
   Token t's deviation is d_t = ‖K*_t − K_t‖² + ‖V*_t − V_t‖² (summed over heads), with K, V the
   spliced cache of layer s. The ⌈r·L⌉ tokens with the largest d_t are selected (``recompute`` r;
   ties by position). Tokens of the first chunk have d_t = 0 up to rounding: their cache already is
   the full prefill's.
2. **Recompute.** One forward of the selected tokens S (at their own positions) over the spliced
   cache: token i ∈ S attends to the cached slots j < p_i that are not selected, and causally to
   the selected tokens (their fresh KV, computed in this forward, replace their stale slots). Their
   new KV of every layer is written into their slots.

With r = 1 every token is recomputed against nothing stale: the result is the KV of a full prefill
of the chunks' text (the text path); with r = 0 it is plain injection. The recompute forward needs
a model that takes a 4D attention mask; :func:`check_blend` verifies r = 1 against a full prefill
on the model itself at start-up and refuses a model where it does not hold.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from rcd.compat import cache_kwargs, cache_layers, output_cache
from rcd.errors import RcdError
from rcd.hooks import find_decoder_layers

KV = list  # [(keys [1, h, L, d], values [1, h, L, d]) per layer]


class BlendError(RcdError, ValueError):
    """Selective recompute cannot run on this model or with these settings."""


class _Stop(Exception):
    pass


def _runner(model):
    """The decoder without its LM head (no vocabulary logits are needed here)."""
    base = getattr(model, "base_model", None)
    return base if base is not None and base is not model else model


@torch.inference_mode()
def layer_kv(model, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of block ``layer`` for ``tokens`` [L] at positions 0..L-1 (full causal
    context), from a forward stopped right after that block."""
    from transformers import DynamicCache

    block = find_decoder_layers(model)[layer]

    def stop(*_):
        raise _Stop

    cache = DynamicCache(config=model.config)
    handle = block.register_forward_hook(stop)
    try:
        x = tokens.view(1, -1)
        run = _runner(model)
        run(input_ids=x, position_ids=torch.arange(x.shape[1], device=x.device).view(1, -1), use_cache=True,
            **cache_kwargs(run, cache))
    except _Stop:
        pass
    finally:
        handle.remove()
    k, v = cache_layers(cache)[layer]
    return k, v


def kv_deviation(model, tokens: torch.Tensor, kv: KV, layer: int) -> torch.Tensor:
    """d_t [L] of the spliced cache ``kv`` against a full prefill, at block ``layer`` (module doc)."""
    k_full, v_full = layer_kv(model, tokens, layer)
    k, v = kv[layer]
    return ((k_full.float() - k.float()) ** 2).sum((0, 1, 3)) + ((v_full.float() - v.float()) ** 2).sum((0, 1, 3))


def select(deviation: torch.Tensor, fraction: float) -> torch.Tensor:
    """Positions (sorted) of the ⌈fraction·L⌉ largest deviations; ties by position."""
    n = min(len(deviation), math.ceil(float(fraction) * len(deviation) - 1e-9))
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = sorted(range(len(deviation)), key=lambda t: (-float(deviation[t]), t))
    return torch.tensor(sorted(order[:n]), dtype=torch.long)


@torch.inference_mode()
def recompute(model, tokens: torch.Tensor, kv: KV, positions: torch.Tensor) -> KV:
    """``kv`` with the slots ``positions`` (sorted) replaced by their KV recomputed over the rest of
    the cache (module doc, step 2)."""
    from transformers import DynamicCache

    if len(positions) == 0:
        return kv
    dev = kv[0][0].device
    L, S = kv[0][0].shape[2], len(positions)
    pos = positions.to(dev)
    stale = torch.zeros(L, dtype=torch.bool, device=dev)
    stale[pos] = True
    allowed_cache = (torch.arange(L, device=dev).view(1, -1) < pos.view(-1, 1)) & ~stale.view(1, -1)  # [S, L]
    allowed_new = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    allowed = torch.cat([allowed_cache, allowed_new], 1)
    dtype = kv[0][0].dtype
    mask = torch.zeros(1, 1, S, L + S, dtype=dtype, device=dev).masked_fill(~allowed.view(1, 1, S, L + S),
                                                                           torch.finfo(dtype).min)
    cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in kv], config=model.config)
    run = _runner(model)
    run(input_ids=tokens.to(dev)[pos].view(1, -1), position_ids=pos.view(1, -1), attention_mask=mask,
        use_cache=True, **cache_kwargs(run, cache))
    out = []
    for (k, v), (k_new, v_new) in zip(kv, cache_layers(cache)):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, pos] = k_new[:, :, L:L + S].to(k.dtype)
        v2[:, :, pos] = v_new[:, :, L:L + S].to(v.dtype)
        out.append((k2, v2))
    return out


def blend(model, tokens: torch.Tensor, kv: KV, fraction: float, select_layer: int = 1) -> tuple[KV, int]:
    """Spliced chunk KV ``kv`` of ``tokens`` [L] with the ⌈fraction·L⌉ most deviating tokens recomputed;
    returns (kv, tokens recomputed). fraction 0: unchanged; 1: every token (no selection pass)."""
    if fraction <= 0:
        return kv, 0
    L = int(tokens.numel())
    if fraction >= 1:
        positions = torch.arange(L, dtype=torch.long)
    else:
        positions = select(kv_deviation(model, tokens.to(kv[0][0].device), kv, select_layer).cpu(), fraction)
    return recompute(model, tokens, kv, positions), int(len(positions))


def check_blend(model, select_layer: int) -> None:
    """Refuse a model on which recomputing every token of a spliced two-chunk prefix does not give the
    keys and values of a full prefill (the recompute forward's 4D mask is not honoured)."""
    layers = find_decoder_layers(model)
    if not -len(layers) <= int(select_layer) < len(layers):
        raise BlendError(f"select_layer={select_layer} is out of range: the model has {len(layers)} blocks")
    dev = next(model.parameters()).device
    vocab = max(2, model.get_output_embeddings().out_features)
    tokens = (torch.arange(3, 13, device=dev) * 7) % vocab
    with torch.inference_mode():
        def alone(ids, start):
            out = _runner(model)(input_ids=ids.view(1, -1), use_cache=True,
                                 position_ids=torch.arange(start, start + len(ids), device=dev).view(1, -1))
            return cache_layers(output_cache(out))

        full = alone(tokens, 0)
        first, second = alone(tokens[:6], 0), alone(tokens[6:], 6)  # the second chunk at its own offset
        spliced = [(torch.cat([a[0], b[0]], 2), torch.cat([a[1], b[1]], 2)) for a, b in zip(first, second)]
        got = recompute(model, tokens, spliced, torch.arange(len(tokens)))
    for layer, ((k, v), (kf, vf)) in enumerate(zip(got, full)):
        tol = max(1e-3, 8 * torch.finfo(k.dtype).eps) * (1.0 + float(kf.float().abs().max()))
        if float((k.float() - kf.float()).abs().max()) > tol or float((v.float() - vf.float()).abs().max()) > tol:
            raise BlendError(f"strategy.control.recompute: recomputing every token of a spliced prefix does not "
                             f"reproduce a full prefill on {type(model).__name__} (layer {layer}): the model does not "
                             "take a 4D attention mask; use strategy.control.recompute=0")


def token_ids(source, ids: Sequence[int]) -> torch.Tensor:
    """The token ids [L] of chunks ``ids`` concatenated, from a KV source with ``tokens(i)``."""
    return torch.cat([torch.as_tensor(source.tokens(int(i))).view(-1).long() for i in ids])
