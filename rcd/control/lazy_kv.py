"""Chunks × inject: the KV cache of a retrieved chunk's text, computed on first use and cached.

No precomputed latent store: a chunk datastore's passage text is run through the model alone
(positions 0..L-1) the first time it is retrieved; its per-layer keys and values are kept in an
in-memory cache (least recently used first out, at most ``cache_chunks`` chunks) and injected as
the cache prefix exactly as :class:`rcd.control.inject.KVInjection` injects stored chunk KV
(re-rotated to their offsets with ``positions=shift``). Keyed by (datastore folder, chunk id, model).
``recompute`` > 0 repairs the spliced chunks by selective recompute (:mod:`rcd.control.blend`).

``anchor`` (a text A, default none): every chunk is encoded as the continuation of A's tokens
(positions |A|..|A|+L-1, only the chunk's own KV kept), and A's KV, computed once, opens every
injected prefix: [A][c_1]...[c_m][prompt]. Chunks encoded alone start at position 0, so each
chunk's first token takes the attention-sink role a sequence's first token has (its key and value
are unlike any mid-text token's), and m spliced chunks show the prompt m sinks; after a shared
anchor the sink is A's, once (the shared prefix of APE, Yang et al., 2025). With one chunk the
prefix equals a fresh forward of A + the chunk's text; with r = 1, of A + all chunks' texts.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch

from rcd.compat import cache_layers, output_cache
from rcd.control.inject import InjectError, KVInjection


class ChunkKV:
    """``kv(ids, dtype)`` / ``length(i)`` of chunk texts, computed by ``lm`` on first use (LRU cache)."""

    def __init__(self, lm, chunks, max_tokens: int = 256, cache_chunks: int = 1024, anchor: Optional[str] = None
                 ) -> None:
        self.lm, self.chunks = lm, chunks
        self.max_tokens, self.cache_chunks = int(max_tokens), int(cache_chunks)
        self.cache: OrderedDict[int, tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.computed = 0  # chunks run through the model (cache misses)
        self._anchor = None  # (token ids [A], per-layer KV of A alone)
        if anchor:
            ids = lm.tokenizer(anchor, add_special_tokens=False)["input_ids"]
            if not ids:
                raise InjectError(f"strategy.control.anchor={anchor!r} has no tokens; use a non-empty text or null")
            x = torch.tensor([ids], device=lm.device)
            with torch.inference_mode():
                out = lm.model(input_ids=x, position_ids=torch.arange(len(ids), device=x.device).view(1, -1),
                               use_cache=True)
            self._anchor = (x[0], [(k.detach(), v.detach()) for k, v in cache_layers(output_cache(out))])

    def anchor(self) -> Optional[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """(token ids [A], per-layer KV) of the anchor every chunk was encoded after, or None."""
        return self._anchor

    def _text(self, i: int) -> str:
        return self.chunks.text(int(i))

    @torch.inference_mode()
    def _entry(self, i: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(token ids [L], per-layer KV) of chunk ``i``."""
        i = int(i)
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        ids = self.lm.tokenizer(self._text(i), add_special_tokens=False)["input_ids"][: self.max_tokens] or [0]
        x = torch.tensor([ids], device=self.lm.device)
        a_ids = self._anchor[0] if self._anchor is not None else x[0, :0]
        A = len(a_ids)
        run = torch.cat([a_ids.view(1, -1), x], 1)
        out = self.lm.model(input_ids=run, position_ids=torch.arange(A + len(ids), device=x.device).view(1, -1),
                            use_cache=True)
        # the chunk's own slots (keys at positions A..A+L-1, after the anchor)
        kv = [(k[:, :, A:].detach(), v[:, :, A:].detach()) for k, v in cache_layers(output_cache(out))]
        self.computed += 1
        self.cache[i] = (x[0], kv)
        while len(self.cache) > self.cache_chunks:
            self.cache.popitem(last=False)
        return self.cache[i]

    def entry(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._entry(i)[1]

    def tokens(self, i: int) -> torch.Tensor:
        """The LM token ids [L] chunk ``i``'s KV was computed from."""
        return self._entry(i)[0]

    def length(self, i: int) -> int:
        return int(self.entry(i)[0][0].shape[2])

    def kv(self, ids, dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parts = [self.entry(i) for i in ids if int(i) >= 0]
        return [(torch.cat([p[layer][0] for p in parts], 2).to(dtype or parts[0][layer][0].dtype),
                 torch.cat([p[layer][1] for p in parts], 2).to(dtype or parts[0][layer][1].dtype))
                for layer in range(len(parts[0]))]


class LazyKVInjection(KVInjection):
    """how = inject (KV prefix) over a chunk datastore: chunk KV computed on first retrieval, then cached."""

    name = "lazy_kv"
    accepts_units: tuple[str, ...] = ("chunks",)

    def __init__(self, positions: str = "shift", max_prefix_tokens: Optional[int] = None, max_chunk_tokens: int = 256,
                 cache_chunks: int = 1024, recompute: float = 0.0, select_layer: int = 1,
                 anchor: Optional[str] = None) -> None:
        super().__init__(positions=positions, max_prefix_tokens=max_prefix_tokens, recompute=recompute,
                         select_layer=select_layer)
        if int(max_chunk_tokens) < 1 or int(cache_chunks) < 1:
            raise InjectError(f"LazyKVInjection: max_chunk_tokens={max_chunk_tokens} and cache_chunks={cache_chunks} "
                              "must be >= 1")
        if anchor is not None and positions != "shift":
            raise InjectError("LazyKVInjection: an anchor places every chunk after it (positions=shift); "
                              f"got positions={positions!r}")
        self.max_chunk_tokens, self.cache_chunks = int(max_chunk_tokens), int(cache_chunks)
        self.anchor_text = anchor or None
        self.store: Optional[ChunkKV] = None

    @staticmethod
    def check_datastore_config(ds_cfg) -> None:
        pass  # any chunk datastore: its texts are all it needs

    def bind(self, datastore=None, **_: Any) -> "LazyKVInjection":
        if datastore is not None and datastore is not self.datastore:
            if not hasattr(datastore, "text"):
                raise InjectError(f"LazyKVInjection needs a chunk datastore (datastore=chunks); got "
                                  f"{type(datastore).__name__}")
            self.datastore, self.store = datastore, None
        return self

    def prepare(self, lm, eos_ids) -> None:
        super().prepare(lm, eos_ids)
        if self.store is None or self.store.lm is not lm:
            self.store = ChunkKV(lm, self.datastore, self.max_chunk_tokens, self.cache_chunks, self.anchor_text)

    def kv_source(self) -> ChunkKV:
        if self.store is None:
            raise InjectError("LazyKVInjection is not prepared: build it through rcd.engine.Engine (prepare(lm))")
        return self.store

    def __repr__(self) -> str:
        return (f"LazyKVInjection(positions={self.positions!r}, max_prefix_tokens={self.max_prefix_tokens}, "
                f"cache_chunks={self.cache_chunks}, recompute={self.recompute}, anchor={self.anchor_text!r})")
