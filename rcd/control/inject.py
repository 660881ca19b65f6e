"""The "how = inject" axis: retrieved latents enter the model's computation, training-free.

(a) :class:`KVInjection` — TurboRAG / Block-Attention style. The latent datastore stores, per
    chunk c of L_c tokens, the attention keys and values of every layer computed with the chunk
    alone at positions 0..L_c-1. The retrieved chunks c_1..c_m become the *cache prefix*; the
    prompt is prefilled after them (by :class:`rcd.engine.Engine`, which owns the cache), so the
    prompt attends to the chunks as if their text preceded it, without recomputing them.

    Positions (the choice matters for RoPE models, whose cached keys carry their position):

    * ``positions="shift"`` (default, Block-Attention): chunk c_i is placed at offset
      o_i = Σ_{j<i} L_j; its keys are re-rotated by o_i (RoPE: R(p + o) = R(o)·R(p), so rotating
      a key cached at position p by o gives exactly the key at p + o); the prompt starts at
      P = Σ_i L_i. With one chunk this reproduces "chunk text + prompt" exactly; with several, the
      only difference to concatenated text is that chunks do not attend to each other.
    * ``positions="independent"`` (TurboRAG's independent positions): keys are left as cached,
      every chunk occupies 0..L_i-1, and the prompt starts at max_i L_i.

    Re-rotation uses the model's own rotary-embedding module (found generically: a module with an
    ``inv_freq`` buffer) and is verified at start-up on the model itself (:meth:`KVInjection.check`):
    a model whose keys are not rotated in the rotate-half layout is refused for ``shift``.

(b) :class:`KNNAttention` — Memorizing-Transformer style attention to retrieved memories, in the
    residual stream of one block. Memories are (key, value) hidden states of the corpus tokens at
    block l (the datastore's ``memory_layer``). A forward hook on block l takes its output h_t at
    each active position, retrieves the k nearest memories (s_i, v_i) and mixes::

        a = softmax(s / τ)  (s: -squared L2 distances (default), or inner products; τ default:
                             the mean of the k distances, or √H for inner products)
        m_t = Σ_i a_i v_i
        h_t ← (1 - g)·h_t + g·m_t          (g: the gate, a fixed scalar in [0, 1])

    so later blocks read a representation pulled toward what followed similar contexts in the
    corpus. Memories are searched by L2 distance: inner products of raw hidden states are won by
    the attention-sink states (the first token of every stored chunk has norm ~20x the others in
    SmolLM2), which turned the mix into noise (perplexity 1.4e5 before this was found).
    Memorizing Transformer attends to memories per head with learned gates; here the gate is a
    fixed scalar and attention happens on the hidden state the memories were keyed by
    (the same space, no projections), which keeps the hook generic across architectures. Which
    rows/positions are active is set by the engine from the schedule (``before_forward``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from rcd.compat import cache_layers, output_cache
from rcd.control.base import Control
from rcd.errors import RcdError
from rcd.hooks import resolve_layer

POSITIONS = ("shift", "independent")


class InjectError(RcdError):
    pass


@dataclass
class PrefixKV:
    """An injected cache prefix for R rows: per layer keys/values [R, heads, P, d] (left-padded),
    mask [R, P] (1 = real), and the position of each row's first prompt token."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    next_pos: torch.Tensor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def find_rotary(model) -> Optional[torch.nn.Module]:
    """The model's rotary-embedding module (a module holding an ``inv_freq`` buffer, or one per layer
    type: ``<layer type>_inv_freq``, e.g. Gemma-3's sliding and full attention bases), or None."""
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            return module
        if any(name.endswith("_inv_freq") for name, _ in module.named_buffers(recurse=False)):
            return module
    return None


def layer_types(model) -> Optional[list[str]]:
    """Per decoder layer, its attention type (``config.layer_types``, e.g. sliding / full), if the model has them."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or getattr(getattr(cfg, "text_config", None), "layer_types", None)
    return list(types) if types else None


class KVInjection(Control):
    """how = inject (KV prefix): cache = [chunk KVs (positions per ``positions``)] + prompt + generation."""

    name = "latent_kv"
    how = "inject"
    accepts_units: tuple[str, ...] = ("latent",)
    rebuilds_prompt = True

    def __init__(self, positions: str = "shift", max_prefix_tokens: Optional[int] = None, recompute: float = 0.0,
                 select_layer: int = 1) -> None:
        if positions not in POSITIONS:
            raise InjectError(f"KVInjection: positions must be one of {POSITIONS}, got {positions!r}")
        if max_prefix_tokens is not None and int(max_prefix_tokens) < 1:
            raise InjectError(f"KVInjection: max_prefix_tokens must be >= 1 or null, got {max_prefix_tokens}")
        if not 0.0 <= float(recompute) <= 1.0:
            raise InjectError(f"KVInjection: recompute is the fraction of prefix tokens recomputed, in [0, 1]; "
                              f"got {recompute}")
        if float(recompute) > 0 and positions != "shift":
            raise InjectError("KVInjection: recompute > 0 recomputes tokens at their spliced positions: it needs "
                              "positions=shift")
        self.positions = positions
        self.max_prefix_tokens = None if max_prefix_tokens is None else int(max_prefix_tokens)
        self.recompute, self.select_layer = float(recompute), int(select_layer)
        self.datastore = None
        self._rotary = None
        self._checked_model = None
        self._blend_checked = None

    @staticmethod
    def check_datastore_config(ds_cfg) -> None:
        """Start-up check of the datastore config (before anything is built)."""
        if ds_cfg is not None and ds_cfg.get("kv") is False:
            raise InjectError("control latent_kv injects the per-chunk KV caches of a latent datastore, but "
                              "datastore.kv=false builds none: set datastore.kv=true, or choose "
                              "strategy/control=knn_attention (memories) or context (chunk text)")

    def bind(self, datastore=None, **_: Any) -> "KVInjection":
        if datastore is not None and datastore is not self.datastore:
            if not hasattr(datastore, "kv"):
                raise InjectError(f"KVInjection needs a latent datastore with KV caches (datastore=latent); "
                                  f"got {type(datastore).__name__}")
            manifest = getattr(datastore, "manifest", None) or {}
            if manifest and not manifest.get("kv"):
                raise InjectError(f"latent datastore {getattr(datastore, 'folder', '')} was built without KV caches "
                                  "(datastore.kv=false): rebuild with datastore.kv=true or choose "
                                  "strategy/control=knn_attention or context")
            self.datastore = datastore
        return self

    def kv_source(self):
        """Where the chunks' KV caches and lengths come from (``kv(ids, dtype)``, ``length(i)``)."""
        return self.datastore

    # ------------------------------------------------------------------ engine protocol
    def prepare(self, lm, eos_ids) -> None:
        self.check(lm.model)  # fails at start-up when the model cannot take the injection
        if self.recompute > 0 and self._blend_checked is not lm.model:
            from rcd.control.blend import BlendError, check_blend

            try:
                check_blend(lm.model, self.select_layer)
            except BlendError as e:
                raise InjectError(str(e)) from None
            self._blend_checked = lm.model

    def kv_prefix(self, run, rows: Sequence[int], cost: dict):
        """The retrieved chunks' KV caches of ``rows`` as the cache prefix (None: no row has one)."""
        ids = [[p.id for p in run.passages[b] if p.id >= 0] for b in rows]
        if not any(ids):
            return None
        return self.prefix(run.engine.lm, ids, cost)

    def score_after(self, scorer) -> torch.Tensor:
        """Each position after a firing position reads the retrieved chunks' KV, then the text."""
        views = []
        for a, b, ps in scorer.segments():
            chunk_ids = [q.id for q in ps]
            plen = self.prefix_length(chunk_ids)
            if plen > scorer.window // 2:
                raise InjectError(f"the injected chunks hold {plen} tokens, more than half the scoring window "
                                  f"({scorer.window}); lower retrieval k or raise task.window")
            views.append({"a": a, "b": b, "kv": chunk_ids, "room": scorer.window - plen})
        lm = scorer.engine.lm
        nll = scorer.nll_none.clone()
        for v, lp in zip(views, scorer.view_logprobs(views, kv_prefix=lambda rows, cost: self.prefix(lm, rows, cost))):
            nll[v["a"]:v["b"]] = -lp
        return nll

    # ------------------------------------------------------------------ positions
    def check(self, model) -> None:
        """Refuse ``positions=shift`` on a model whose cached keys cannot be re-rotated (verified)."""
        if self.positions != "shift" or self._checked_model is model:
            return
        rot = find_rotary(model)
        if rot is None:
            raise InjectError(f"positions=shift re-rotates cached keys, but {type(model).__name__} has no rotary "
                              "embedding (no module with inv_freq); use strategy.control.positions=independent")
        self._rotary = rot
        self._types = layer_types(model) if not isinstance(getattr(rot, "inv_freq", None), torch.Tensor) else None
        dev = next(model.parameters()).device
        ids = torch.arange(3, 9, device=dev).view(1, -1) % max(2, model.get_output_embeddings().out_features)
        with torch.no_grad():
            c0 = cache_layers(output_cache(model(input_ids=ids, position_ids=torch.arange(6, device=dev).view(1, -1),
                                              use_cache=True)))
            c5 = cache_layers(output_cache(model(input_ids=ids, position_ids=torch.arange(5, 11, device=dev).view(1, -1),
                                              use_cache=True)))
        # one layer of each attention type (each has its own RoPE base)
        check = [0] if self._types is None else sorted({self._types.index(t) for t in set(self._types)})
        for layer in check:
            k0, k5 = c0[layer][0], c5[layer][0]
            got = self.rotate(k0, torch.full((6,), 5, device=dev), layer)
            # rotating rounded keys again rounds once more: allow a few units of the cache dtype's precision
            # (bfloat16: ~3% of the largest key), far below the O(1) error of a model that is not rotate-half RoPE
            tol = max(1e-3, 4 * torch.finfo(k0.dtype).eps) * float(k5.float().abs().max())
            if float((got.float() - k5.float()).abs().max()) > tol:
                raise InjectError(f"positions=shift: re-rotating the cached keys of {type(model).__name__} (layer "
                                  f"{layer}) does not reproduce keys at shifted positions (not a rotate-half RoPE "
                                  "model); use strategy.control.positions=independent")
        self._checked_model = model

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Keys [..., P, d] of decoder layer ``layer`` moved by ``delta`` [P] positions (RoPE rotation R(delta),
        with the layer's own base when the model has one per attention type)."""
        rot = self._rotary
        pos = delta.view(1, -1).to(keys.device)
        layer_type = None if getattr(self, "_types", None) is None else self._types[layer]
        if layer_type is None:
            cos, sin = rot(keys.float(), position_ids=pos)  # [1, P, d], scaled by attention_scaling
            scale = float(getattr(rot, "attention_scaling", 1.0) or 1.0)
        else:
            cos, sin = rot(keys.float(), position_ids=pos, layer_type=layer_type)
            scale = float(getattr(rot, f"{layer_type}_attention_scaling", 1.0) or 1.0)
        cos, sin = cos[0] / scale, sin[0] / scale
        k = keys.float()
        return (k * cos + rotate_half(k) * sin).to(keys.dtype)

    # ------------------------------------------------------------------ prefix
    def lengths(self, ids: Sequence[int]) -> list[int]:
        return [int(self.kv_source().length(int(i))) for i in ids]

    def anchor(self):
        """(token ids [A], per-layer KV) that open every prefix when the KV source encodes its chunks after an
        anchor text (:class:`rcd.control.lazy_kv.ChunkKV`), else None."""
        get = getattr(self.kv_source(), "anchor", None)
        return get() if callable(get) else None

    def prefix_length(self, ids: Sequence[int]) -> int:
        """Cache positions the prefix of chunks ``ids`` takes (the anchor's too), and where the prompt starts."""
        ids = self._cap(list(ids))
        if not ids:
            return 0
        anchor = self.anchor()
        return (0 if anchor is None else len(anchor[0])) + sum(self.lengths(ids))

    def _cap(self, ids: list[int]) -> list[int]:
        ids = [int(i) for i in ids if int(i) >= 0]
        if self.max_prefix_tokens is None:
            return ids
        out, total = [], 0
        for i, n in zip(ids, self.lengths(ids)):
            if total + n > self.max_prefix_tokens:
                break
            out.append(i)
            total += n
        return out

    def prefix(self, lm, rows: Sequence[Sequence[int]], cost: Optional[dict] = None) -> PrefixKV:
        """The injected prefix for each row's retrieved chunk ids (rows without chunks: empty)."""
        if self.datastore is None:
            raise InjectError("KVInjection is unbound: bind(datastore=<latent datastore>)")
        self.check(lm.model)
        t0 = time.perf_counter()
        dtype = next(lm.model.parameters()).dtype
        dev = lm.device
        anchor = self.anchor()  # its KV opens every row's prefix; chunk keys are already after it
        A = 0 if anchor is None else len(anchor[0])
        per_row, lens, starts, capped = [], [], [], []
        for ids in rows:
            ids = self._cap(list(ids))
            capped.append(ids)
            if not ids:
                per_row.append(None)
                lens.append(0)
                starts.append(0)
                continue
            kv = self.kv_source().kv(ids, dtype=dtype)
            ls = self.lengths(ids)
            if self.positions == "shift":
                delta = torch.cat([torch.full((n,), off, dtype=torch.long)
                                   for n, off in zip(ls, [sum(ls[:j]) for j in range(len(ls))])])
                kv = [(self.rotate(k, delta, layer), v) for layer, (k, v) in enumerate(kv)]
                if anchor is not None:
                    kv = [(torch.cat([ak.to(k.dtype), k], 2), torch.cat([av.to(v.dtype), v], 2))
                          for (ak, av), (k, v) in zip(anchor[1], kv)]
                starts.append(A + sum(ls))
            else:
                starts.append(max(ls))
            per_row.append(kv)
            lens.append(A + sum(ls))
        P = max(lens)
        if P == 0:
            raise InjectError("no chunk to inject in any row")
        ref = next(kv for kv in per_row if kv is not None)
        keys, values = [], []
        for layer in range(len(ref)):
            h, d = ref[layer][0].shape[1], ref[layer][0].shape[3]
            hv, dv = ref[layer][1].shape[1], ref[layer][1].shape[3]
            k_pad = torch.zeros(len(rows), h, P, d, dtype=dtype, device=dev)
            v_pad = torch.zeros(len(rows), hv, P, dv, dtype=dtype, device=dev)
            for r, kv in enumerate(per_row):
                if kv is not None:
                    k_pad[r, :, P - lens[r]:] = kv[layer][0][0].to(dev)
                    v_pad[r, :, P - lens[r]:] = kv[layer][1][0].to(dev)
            keys.append(k_pad)
            values.append(v_pad)
        mask = torch.zeros(len(rows), P, dtype=torch.long, device=dev)
        for r, n in enumerate(lens):
            if n:
                mask[r, P - n:] = 1
        blend_s = 0.0  # selective recompute: model time, not retrieval
        if self.recompute > 0:
            t1 = time.perf_counter()
            keys, values = self._blend(lm, capped, keys, values, mask)
            blend_s = time.perf_counter() - t1
        if cost is not None:
            cost["retrieval_s"] += time.perf_counter() - t0 - blend_s
            cost["model_s"] += blend_s
        return PrefixKV(keys=keys, values=values, mask=mask, next_pos=torch.tensor(starts, dtype=torch.long))

    def _blend(self, lm, rows: list[list[int]], keys, values, mask):
        """CacheBlend-style selective recompute of every row's spliced chunks, batched
        (:mod:`rcd.control.blend`); a row with one chunk (at offset 0: already its full prefill) is left."""
        from rcd.control.blend import blend_batch, token_ids

        anchor = self.anchor()
        head = [] if anchor is None else [anchor[0].view(-1).long().cpu()]
        row_tokens = [torch.cat(head + [token_ids(self.kv_source(), ids).cpu()]) if len(ids) > 1 else None
                      for ids in rows]
        keys, values, _ = blend_batch(lm.model, row_tokens, keys, values, mask, self.recompute, self.select_layer)
        return keys, values

    def __repr__(self) -> str:
        return (f"KVInjection(positions={self.positions!r}, max_prefix_tokens={self.max_prefix_tokens}, "
                f"recompute={self.recompute})")


class KNNAttention(Control):
    """how = inject (memories): h ← (1-g)·h + g·Σ_i softmax(s/τ)_i v_i at one block's output (module doc)."""

    name = "knn_attention"
    how = "inject"
    accepts_units: tuple[str, ...] = ("latent",)
    retrieves_itself = True
    acts_in_forward = True

    def __init__(self, k: int = 8, gate: float = 0.2, temperature: Optional[float] = None,
                 layer: Optional[Any] = None) -> None:
        if int(k) < 1:
            raise InjectError(f"KNNAttention: k must be >= 1, got {k}")
        if not 0.0 <= float(gate) <= 1.0:
            raise InjectError(f"KNNAttention: gate must be in [0, 1], got {gate}")
        if temperature is not None and not float(temperature) > 0:
            raise InjectError(f"KNNAttention: temperature must be > 0 or null, got {temperature}")
        self.k, self.gate = int(k), float(gate)
        self.temperature = None if temperature is None else float(temperature)
        self.layer = layer
        self.datastore = None
        self.active: Optional[torch.Tensor] = None  # None: every position; [R] rows; [R, T] positions
        self._handle = None
        self._module = None
        self._side = None
        self._on_retrieval: Optional[Callable] = None
        self.last_ids: Optional[torch.Tensor] = None

    @staticmethod
    def check_datastore_config(ds_cfg) -> None:
        if ds_cfg is not None and ds_cfg.get("memories") is False:
            raise InjectError("control knn_attention attends to the per-token memories of a latent datastore, "
                              "but datastore.memories=false builds none: set datastore.memories=true, or choose "
                              "strategy/control=latent_kv (KV caches) or context (chunk text)")

    def bind(self, datastore=None, **_: Any) -> "KNNAttention":
        if datastore is not None and datastore is not self.datastore:
            if not hasattr(datastore, "search_memories"):
                raise InjectError(f"KNNAttention needs a latent datastore with memories (datastore=latent); got "
                                  f"{type(datastore).__name__}")
            manifest = getattr(datastore, "manifest", None) or {}
            if manifest and not manifest.get("memories"):
                raise InjectError(f"latent datastore {getattr(datastore, 'folder', '')} was built without memories "
                                  "(datastore.memories=false): rebuild with datastore.memories=true or choose "
                                  "strategy/control=latent_kv or context")
            self.datastore = datastore
        return self

    def memory_layer(self):
        if self.layer is not None:
            return self.layer
        manifest = getattr(self.datastore, "manifest", None) or {}
        mem = manifest.get("memories") or {}
        layer = mem.get("layer", getattr(self.datastore, "memory_layer", None))
        if layer is None:
            raise InjectError("KNNAttention: the datastore does not say which layer its memories come from; "
                              "set strategy.control.layer")
        return layer if layer in ("final", "lm_head") else int(layer)

    def check(self, model) -> None:
        self._module, self._side = resolve_layer(model, self.memory_layer())

    # ------------------------------------------------------------------ engine protocol
    def prepare(self, lm, eos_ids) -> None:
        self.check(lm.model)

    def before_forward(self, firing: Optional[torch.Tensor]) -> None:
        self.active = firing

    def score_after(self, scorer) -> torch.Tensor:
        """A second pass over the windows with the memories on at the firing positions."""
        fire_set = set(scorer.fires)
        model, ids, nll = scorer.engine.model, scorer.ids, scorer.nll_none.clone()
        self.attach(model, scorer)
        try:
            for begin, end, first in scorer.windows():
                self.active = torch.tensor([[p in fire_set for p in range(begin, end)]])
                t0 = time.perf_counter()
                logits = model(input_ids=ids[begin:end].view(1, -1), use_cache=False).logits[0].float()
                scorer.cost["model_s"] += time.perf_counter() - t0
                lp = torch.log_softmax(logits[first - begin:end - 1 - begin], -1)
                nll[first:end - 1] = -lp.gather(1, ids[first + 1:end].view(-1, 1)).squeeze(1).double().cpu()
        finally:
            self.detach()
        return nll

    # ------------------------------------------------------------------ hook
    def attach(self, model, run=None, on_retrieval: Optional[Callable] = None) -> "KNNAttention":
        """Hook the memory layer; each search reports to ``on_retrieval(mask, ids, scores, seconds)``, by
        default the run's (its time, and generation provenance)."""
        if self.datastore is None:
            raise InjectError("KNNAttention is unbound: bind(datastore=<latent datastore>)")
        self.detach()
        self._module, self._side = resolve_layer(model, self.memory_layer())
        if on_retrieval is None and run is not None:
            on_retrieval = lambda mask, ids, scores, sec: self._report(run, mask, ids, scores, sec)  # noqa: E731
        self._on_retrieval = on_retrieval
        if self._side == "pre":
            self._handle = self._module.register_forward_pre_hook(self._pre)
        else:
            self._handle = self._module.register_forward_hook(self._post)
        return self

    @staticmethod
    def _report(run, mask: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, seconds: float) -> None:
        """A memory search during ``run``: its time, and in generation the provenance of each row's last position."""
        run.cost["retrieval_s"] += seconds
        if run.phase != "generate":
            return
        T = mask.shape[1]
        for n, (r, t) in enumerate(mask.nonzero().tolist()):
            if t == T - 1 and r % run.n_views == 0:
                run.record(r // run.n_views, memory_ids=ids[n, :8].tolist(),
                           scores=[float(x) if math.isfinite(x) else None for x in scores[n, :8].tolist()])

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre(self, module, args):
        if not args:
            return None
        return (self.mix(args[0]),) + tuple(args[1:])

    def _post(self, module, args, output):
        if isinstance(output, (tuple, list)):
            return type(output)([self.mix(output[0])] + list(output[1:]))
        return self.mix(output)

    def weights(self, scores: torch.Tensor, hidden_size: int) -> torch.Tensor:
        """softmax over the k memories; -inf/inf (missing) scores get weight 0 (all missing: all 0).

        τ = ``temperature`` when set. Unset: √H for inner products; for squared L2 distances the
        mean of the query's finite distances (scale-free: distances between raw hidden states of
        a 135M model are ~5e4-1e5, so any fixed τ is model-specific).
        """
        metric = getattr(self.datastore, "memory_metric", "ip")
        s = scores.float()
        if self.temperature is not None:
            tau = torch.tensor(self.temperature)
        elif metric == "l2":
            finite = torch.isfinite(s)
            tau = (torch.where(finite, s, torch.zeros_like(s)).sum(-1, keepdim=True)
                   / finite.sum(-1, keepdim=True).clamp_min(1)).clamp_min(1e-6)
        else:
            tau = torch.tensor(math.sqrt(hidden_size))
        logits = (-s if metric == "l2" else s) / tau
        logits = torch.nan_to_num(logits, nan=float("-inf"), posinf=float("-inf"))
        w = torch.softmax(logits, dim=-1)
        return torch.nan_to_num(w, nan=0.0)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """(1-g)·h + g·Σ a_i v_i at the active positions of h [R, T, H]."""
        R, T, H = h.shape
        act = self.active
        if act is None:
            mask = torch.ones(R, T, dtype=torch.bool, device=h.device)
        elif act.dim() == 1:
            mask = act.to(h.device).view(R, 1).expand(R, T)
        else:
            mask = act.to(h.device)[:, -T:] if act.shape[1] >= T else act.to(h.device)
        if not bool(mask.any()) or self.gate == 0.0:
            return h
        q = h[mask]
        t0 = time.perf_counter()
        scores, ids, values = self.datastore.search_memories(q, self.k)
        seconds = time.perf_counter() - t0
        w = self.weights(scores, H).to(q.dtype)
        m = (w.unsqueeze(-1) * values.to(q.dtype)).sum(1)
        has = (w.sum(-1, keepdim=True) > 0).to(q.dtype)  # rows with no memory keep h
        g = self.gate * has
        out = h.clone()
        out[mask] = (1 - g) * q + g * m
        self.last_ids = ids
        if self._on_retrieval is not None:
            self._on_retrieval(mask, ids, scores, seconds)
        return out

    def __repr__(self) -> str:
        return f"KNNAttention(k={self.k}, gate={self.gate}, temperature={self.temperature}, layer={self.layer})"
