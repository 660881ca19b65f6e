"""KV-cache bookkeeping for left-padded batches: prefill, one step, redo the last position, splice rows.

Rows are left-padded; position ids are explicit (``cumsum(mask) - 1`` plus an injected prefix's
length), so rows of different lengths share one :class:`transformers.DynamicCache`. A row whose
prompt changed is prefilled on its own and its cache rows are spliced into the batch cache (both
sides left-padded to the longer length). A cache with sliding-window layers cannot be spliced or
cropped (:func:`plain_layers`): the caller re-prefills the batch.

:func:`kept_prefix` lets a row be re-prefilled from a prefix of its own cached positions: the KV of
the first ``kept`` real positions of the row is gathered into an injected prefix and only the rest
of the row's new sequence is forwarded after it. The KV of a position depends only on the tokens up to it, so
this equals a fresh prefill of the whole new sequence (up to floating-point rounding).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rcd.compat import cache_kwargs, output_cache
from rcd.errors import RcdError


@dataclass
class CacheState:
    cache: Any
    mask: torch.Tensor  # [R, L] long
    next_pos: torch.Tensor  # [R] long
    logits: Optional[torch.Tensor]  # [R, V] float (last position)
    last: Optional[torch.Tensor] = None  # [R] token fed by the last step


def forward(model, ids, mask, pos, cache, cost: dict, keep: int = 1):
    """One cached forward; its seconds go to ``cost["model_s"]``."""
    t0 = time.perf_counter()
    kwargs = {"logits_to_keep": keep} if keep else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(model, cache),
                **kwargs)
    cost["model_s"] += time.perf_counter() - t0
    return out


def forward_padded(model, pad_id: int, device, seqs: list[list[int]], cost: dict, prefix=None, keep: int = 1):
    """One forward over left-padded ``seqs`` (after an optional injected KV ``prefix``, a PrefixKV);
    logits of the last ``keep`` positions of every row. Returns (output, full mask, position ids)."""
    from transformers import DynamicCache

    R, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    m = torch.zeros((R, T), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s) == 0:
            raise RcdError("cannot prefill an empty sequence")
        ids[r, T - len(s):] = torch.tensor(s, dtype=torch.long)
        m[r, T - len(s):] = 1
    ids, m = ids.to(device), m.to(device)
    pos = (m.cumsum(1) - 1).clamp_min(0)
    if prefix is not None:
        cache = DynamicCache(ddp_cache_data=list(zip(prefix.keys, prefix.values)), config=model.config)
        pos = pos + prefix.next_pos.to(device).view(-1, 1)
        full = torch.cat([prefix.mask.to(device), m], 1)
    else:
        cache = DynamicCache(config=model.config)
        full = m
    out = forward(model, ids, full, pos, cache, cost, keep=keep)
    return out, full, pos


def prefill(model, pad_id: int, device, seqs: list[list[int]], cost: dict, prefix=None) -> CacheState:
    out, full, pos = forward_padded(model, pad_id, device, seqs, cost, prefix=prefix, keep=1)
    return CacheState(cache=output_cache(out), mask=full, next_pos=pos[:, -1] + 1, logits=out.logits[:, -1].float())


def step(model, device, state: CacheState, tokens: torch.Tensor, cost: dict) -> CacheState:
    R = tokens.shape[0]
    mask = torch.cat([state.mask, torch.ones((R, 1), dtype=state.mask.dtype, device=state.mask.device)], 1)
    pos = state.next_pos.view(R, 1)
    out = forward(model, tokens.view(R, 1).to(device), mask, pos, state.cache, cost)
    return CacheState(cache=output_cache(out), mask=mask, next_pos=state.next_pos + 1,
                      logits=out.logits[:, -1].float(), last=tokens.view(R).to(device))


def drop_last(state: CacheState) -> CacheState:
    """The state before its last step (the cache loses its last position; feed ``state.last`` again)."""
    state.cache.crop(-1)
    return CacheState(cache=state.cache, mask=state.mask[:, :-1], next_pos=state.next_pos - 1, logits=None)


def plain_layers(cache) -> bool:
    """Whether every layer of ``cache`` keeps all positions (no sliding window): rows can be spliced and cropped."""
    from transformers.cache_utils import DynamicLayer

    return all(type(x) is DynamicLayer for x in cache.layers)  # sliding-window layers are subclasses


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def length_groups(lengths: Sequence[int], slack: float = 1.25, pad: int = 64) -> list[list[int]]:
    """Indices of ``lengths`` in groups to forward together: longest first, a group grows while its
    left-padded size (members × longest) stays within ``slack`` × its real tokens + ``pad``. Padding
    is compute, so rows whose new tails differ much in length are forwarded apart; short tails
    (decoding-like forwards, bound by reading the weights) stay together."""
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    groups: list[list[int]] = []
    real = 0
    for i in order:
        n = int(lengths[i])
        if groups and (len(groups[-1]) + 1) * int(lengths[groups[-1][0]]) <= slack * (real + n) + pad:
            groups[-1].append(i)
            real += n
        else:
            groups.append([i])
            real = n
    return [sorted(g) for g in groups]


def kept_prefix(state: CacheState, rows: Sequence[int], kept: Sequence[int]):
    """The first ``kept[i]`` real cached positions of row ``rows[i]`` of ``state`` as an injected prefix
    (a left-padded ``PrefixKV`` whose rows continue at position ``kept[i]``), or None when nothing is kept.

    Prefilling a row's new tokens after it equals a fresh prefill of the whole row (the KV of a
    position depends only on the tokens up to it). The rows' cache must hold plain positions 0, 1, ...
    (no injected prefix) in layers that keep every position (:func:`plain_layers`)."""
    from rcd.control.inject import PrefixKV

    P = max(kept) if kept else 0
    if P == 0:
        return None
    R = len(rows)
    mdev = state.mask.device
    idx = torch.zeros((R, P), dtype=torch.long, device=mdev)
    mask = torch.zeros((R, P), dtype=torch.long, device=mdev)
    for i, (r, p) in enumerate(zip(rows, kept)):
        if p:
            real = torch.nonzero(state.mask[r], as_tuple=False).view(-1)[:p]
            if real.numel() < p:
                raise RcdError(f"kept_prefix: cache row {r} holds {real.numel()} positions, not {p}")
            idx[i, P - p:] = real
            mask[i, P - p:] = 1
    sel = torch.tensor(list(rows), dtype=torch.long, device=mdev)
    keys, values = [], []
    for layer in state.cache.layers:
        k, v = layer.keys[sel.to(layer.keys.device)], layer.values[sel.to(layer.values.device)]
        g = idx.to(k.device).view(R, 1, P, 1).expand(R, k.shape[1], P, k.shape[3])
        keys.append(torch.gather(k, 2, g))
        values.append(torch.gather(v, 2, g))
    return PrefixKV(keys=keys, values=values, mask=mask, next_pos=torch.tensor(list(kept), dtype=torch.long))


def splice(old: CacheState, sub: CacheState, rows: Sequence[int]) -> CacheState:
    """``old`` with cache rows ``rows`` replaced by ``sub`` (both left-padded to the longer length);
    both caches must keep every position (:func:`plain_layers`)."""
    layers_old, layers_sub = old.cache.layers, sub.cache.layers
    if not (plain_layers(old.cache) and plain_layers(sub.cache)):
        raise RcdError("splice: a cache with sliding-window layers cannot be spliced; re-prefill the batch")
    L0, L1 = old.mask.shape[1], sub.mask.shape[1]
    L = max(L0, L1)
    idx = torch.tensor(list(rows), dtype=torch.long, device=old.mask.device)

    def pad(x, n, dim):  # left-pad dimension ``dim`` of x to length n with zeros
        if x.shape[dim] == n:
            return x
        shape = list(x.shape)
        shape[dim] = n - x.shape[dim]
        return torch.cat([x.new_zeros(shape), x], dim=dim)

    for lo, ls in zip(layers_old, layers_sub):
        k, v = pad(lo.keys, L, 2), pad(lo.values, L, 2)
        k[idx] = pad(ls.keys, L, 2).to(k.dtype)
        v[idx] = pad(ls.values, L, 2).to(v.dtype)
        lo.keys, lo.values = k, v
    mask = pad(old.mask, L, 1)
    mask[idx] = pad(sub.mask, L, 1)
    next_pos = old.next_pos.clone()
    next_pos[idx] = sub.next_pos
    logits = old.logits.clone()
    logits[idx] = sub.logits
    return CacheState(cache=old.cache, mask=mask, next_pos=next_pos, logits=logits, last=old.last)
