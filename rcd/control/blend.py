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
def layer_kv_batch(model, tokens: torch.Tensor, mask: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [R, h, P, d] of block ``layer`` for left-padded ``tokens`` [R, P] (``mask`` [R, P]:
    1 = real token; row r's tokens at positions 0..L_r-1, full causal context), from one batched forward
    stopped right after that block."""
    from transformers import DynamicCache

    block = find_decoder_layers(model)[layer]

    def stop(*_):
        raise _Stop

    cache = DynamicCache(config=model.config)
    handle = block.register_forward_hook(stop)
    try:
        run = _runner(model)
        run(input_ids=tokens, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0), use_cache=True,
            **cache_kwargs(run, cache))
    except _Stop:
        pass
    finally:
        handle.remove()
    return cache_layers(cache)[layer]


def deviation_batch(model, tokens: torch.Tensor, keys, values, mask: torch.Tensor, layer: int) -> torch.Tensor:
    """d [R, P] of the spliced, left-padded cache against a full prefill at block ``layer`` (module doc);
    padding slots get -inf."""
    k_full, v_full = layer_kv_batch(model, tokens, mask, layer)
    d = ((k_full.float() - keys[layer].float()) ** 2).sum((1, 3)) \
        + ((v_full.float() - values[layer].float()) ** 2).sum((1, 3))
    return d.masked_fill(mask == 0, float("-inf"))


def select(deviation: torch.Tensor, fraction: float) -> torch.Tensor:
    """Slots (sorted) of the ⌈fraction·L⌉ largest finite deviations (L: the finite ones); ties by slot."""
    valid = torch.isfinite(deviation)
    n = min(int(valid.sum()), math.ceil(float(fraction) * int(valid.sum()) - 1e-9))
    if n <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort((-deviation.float()).masked_fill(~valid, float("inf")), stable=True).indices
    return order[:n].sort().values.long()


@torch.inference_mode()
def recompute_batch(model, tokens: torch.Tensor, keys: list, values: list, mask: torch.Tensor,
                    slots: Sequence[torch.Tensor], inplace: bool = False) -> tuple[list, list]:
    """Left-padded spliced cache (per layer [R, h, P, d]) with the slots ``slots[r]`` (sorted) of each row
    replaced by their KV recomputed over the rest of the row's cache, all rows in one forward (module
    doc, step 2). A padding query of a row with fewer slots attends to itself only; its output is dropped.
    ``inplace``: write into ``keys`` / ``values`` themselves (the caller's own copies)."""
    from transformers import DynamicCache

    R, P = tokens.shape
    S = max((len(x) for x in slots), default=0)
    if S == 0:
        return keys, values
    dev = tokens.device
    q_slot = torch.full((R, S), -1, dtype=torch.long, device=dev)
    for r, x in enumerate(slots):
        q_slot[r, :len(x)] = x.to(dev)
    valid_q = q_slot >= 0
    start = P - mask.sum(1)  # where each row's tokens begin (left padding)
    ids = tokens.gather(1, q_slot.clamp_min(0))
    pos = torch.where(valid_q, q_slot - start.view(-1, 1), torch.zeros_like(q_slot))
    stale = torch.zeros(R, P, dtype=torch.bool, device=dev)
    stale.scatter_(1, q_slot.clamp_min(0), valid_q)
    j = torch.arange(P, device=dev).view(1, 1, P)
    allowed_cache = (mask.bool() & ~stale).view(R, 1, P) & (j < q_slot.view(R, S, 1)) & valid_q.view(R, S, 1)
    tril = torch.ones(S, S, dtype=torch.bool, device=dev).tril().view(1, S, S)
    allowed_new = (tril & valid_q.view(R, 1, S) & valid_q.view(R, S, 1)) | torch.eye(S, dtype=torch.bool, device=dev)
    allowed = torch.cat([allowed_cache, allowed_new], 2)
    dtype = keys[0].dtype
    add = torch.zeros(R, 1, S, P + S, dtype=dtype, device=dev).masked_fill(~allowed.view(R, 1, S, P + S),
                                                                           torch.finfo(dtype).min)
    # the cache appends the new tokens' KV by concatenation: the tensors passed in are not written to
    cache = DynamicCache(ddp_cache_data=list(zip(keys, values)), config=model.config)
    run = _runner(model)
    run(input_ids=ids, position_ids=pos, attention_mask=add, use_cache=True, **cache_kwargs(run, cache))
    rows, cols = valid_q.nonzero(as_tuple=True)
    where = q_slot[rows, cols]
    out_k, out_v = [], []
    for k, v, (k_new, v_new) in zip(keys, values, cache_layers(cache)):
        k2, v2 = (k, v) if inplace else (k.clone(), v.clone())
        k2[rows, :, where] = k_new[rows, :, P + cols].to(k.dtype)
        v2[rows, :, where] = v_new[rows, :, P + cols].to(v.dtype)
        out_k.append(k2)
        out_v.append(v2)
    return out_k, out_v


def recompute(model, tokens: torch.Tensor, kv: KV, positions: torch.Tensor) -> KV:
    """One row: ``kv`` with the slots ``positions`` (sorted) recomputed over the rest of the cache."""
    x = tokens.view(1, -1).to(kv[0][0].device)
    ks, vs = recompute_batch(model, x, [k for k, _ in kv], [v for _, v in kv], torch.ones_like(x), [positions])
    return list(zip(ks, vs))


def blend_batch(model, row_tokens: Sequence, keys: list, values: list, mask: torch.Tensor, fraction: float,
                select_layer: int = 1) -> tuple[list, list, int]:
    """The left-padded spliced prefix (per layer [R, h, P, d], ``mask`` [R, P]) with the ⌈fraction·L_r⌉
    most deviating tokens of every row r whose ``row_tokens[r]`` [L_r] is given recomputed (one selection
    forward and one recompute forward for the batch; fraction 1: every token, no selection pass).
    Returns (keys, values, tokens recomputed)."""
    rows = [r for r, t in enumerate(row_tokens) if t is not None]
    if fraction <= 0 or not rows:
        return keys, values, 0
    dev = mask.device
    P = mask.shape[1]
    idx = torch.tensor(rows, device=dev)
    sub_mask = mask[idx]
    tokens = torch.zeros(len(rows), P, dtype=torch.long, device=dev)
    for i, r in enumerate(rows):
        t = torch.as_tensor(row_tokens[r]).view(-1).to(dev)
        if int(sub_mask[i].sum()) != len(t):
            raise BlendError(f"row {r}: {len(t)} token ids for {int(sub_mask[i].sum())} prefix slots")
        tokens[i, P - len(t):] = t
    everyone = len(rows) == mask.shape[0]
    sub_k, sub_v = [k[idx] for k in keys], [v[idx] for v in values]  # copies (index select): recomputed in place
    if fraction >= 1:
        slots = [m.nonzero().view(-1) for m in sub_mask]
    else:
        d = deviation_batch(model, tokens, sub_k, sub_v, sub_mask, select_layer).cpu()
        slots = [select(row, fraction) for row in d]
    sub_k, sub_v = recompute_batch(model, tokens, sub_k, sub_v, sub_mask, slots, inplace=True)
    if everyone:
        return sub_k, sub_v, int(sum(len(x) for x in slots))
    keys, values = [k.clone() for k in keys], [v.clone() for v in values]
    for k, sk in zip(keys, sub_k):
        k[idx] = sk
    for v, sv in zip(values, sub_v):
        v[idx] = sv
    return keys, values, int(sum(len(x) for x in slots))


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
