"""Latent datastore (the "what = latent" unit): chunk KV caches and per-token memories of the LM.

Built with the LM itself, from chunks of the corpus (:mod:`rcd.datastore.chunking`; token
chunking keeps the exact LM token ids, other chunkings tokenize each chunk's text). Each chunk
c of L_c tokens is run through the LM **alone, at positions 0..L_c-1** (batched with right
padding; padding never reaches a real token), and two things are kept (``kv`` / ``memories``;
the manifest records which):

(a) **KV caches** — for every layer l the attention keys and values of every token,
    ``kv/layer<l>.npy`` of shape [T, 2, kv_heads, head_dim] (float16 by default), T = Σ_c L_c,
    chunk c in rows ``chunk_token_offsets[c]:chunk_token_offsets[c+1]`` (no padding stored).
    Keys are exactly what the model caches (for RoPE models: rotated for positions 0..L_c-1).
    A consumer that places a chunk at another offset p must re-rotate its keys by p (RoPE is
    additive in the position) or give the chunk positions 0..L_c-1; :meth:`LatentDatastore.kv`
    returns [1, kv_heads, Σ L, head_dim] per layer (chunks concatenated in the order asked),
    :meth:`LatentDatastore.kv_cache` the same as a ``transformers.DynamicCache``.
(b) **memories** — per token, the hidden state output by block ``memory_layer`` (an integer;
    ``final`` = the LM-head input) as key, searchable with FAISS (``memory_metric`` ip or l2),
    and as value the hidden state at ``memory_value_layer`` (default: the key itself, stored
    once). Like Memorizing-Transformer / kNN-attention memories, but in the residual stream: a
    consumer that attends to them at block ``memory_layer + 1`` projects them with that block's
    norm and k/v projections. Memory i is token i of the flat token array (its chunk:
    :meth:`memory_chunk`). ``search_memories(q [N, H], k) -> (scores, ids, values [N, k, H])``.

The chunk texts and a text retriever are a :class:`~rcd.datastore.chunks.ChunkDatastore` in the
sub-folder ``text/`` over the same chunks, so ``search(queries, k)`` returns ChunkHits whose ids
index the caches: ``kv(hits.ids[i])``. The manifest records the LM; loading with another model
is refused (:func:`rcd.datastore.base.check_model`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from rcd.compat import cache_layers, output_cache
from rcd.datastore import base
from rcd.datastore.chunks import (ChunkDatastore, ChunkHits, ChunkParams, merge_chunk_store, resolve_parts,
                                  write_chunk_store)
from rcd.datastore.index import IndexSpec, load_or_build_index
from rcd.datastore.shards import shard_label
from rcd.datastore.storage import DatastoreError, NpyAppender, concat_array, folder_bytes, open_array
from rcd.datastore.unit import Plan, Unit
from rcd.hooks import HiddenCapture

log = logging.getLogger(__name__)


def _layer_name(layer) -> str:
    return str(layer)


class LatentDatastore:
    """Per-chunk KV caches and per-token memories of one LM, plus the chunks' texts (see module doc)."""

    unit = "latent"

    def __init__(self, folder: Path, manifest: dict, text: ChunkDatastore, lm, memory_index=None,
                 memory_metric: str = "l2"):
        self.folder = Path(folder)
        self.manifest = manifest
        self.text_store = text
        self.lm = lm
        self.device = lm.device
        self.dtype = next(lm.model.parameters()).dtype
        self.tokens_flat = open_array(self.folder, manifest["chunk_tokens"])
        self.offsets = np.asarray(open_array(self.folder, manifest["chunk_token_offsets"]))
        if len(self.offsets) != len(text) + 1:
            raise DatastoreError(f"{self.folder}: {len(self.offsets) - 1} token chunks but {len(text)} texts; "
                                      f"delete {self.folder} and rebuild")
        self.kv_layers = ([open_array(self.folder, spec) for spec in manifest["kv"]["layers"]]
                          if manifest.get("kv") else None)
        mem = manifest.get("memories")
        self.memory_keys = open_array(self.folder, mem["keys"]) if mem else None
        self.memory_values = (open_array(self.folder, mem["values"]) if mem and mem.get("values")
                              else self.memory_keys)
        self.memory_index = memory_index
        self.memory_metric = memory_metric

    def __len__(self) -> int:
        return len(self.text_store)

    # ---------------------------------------------------------------- payloads
    def text(self, i: int) -> str:
        return self.text_store.text(i)

    def doc_id(self, i: int) -> str:
        return self.text_store.doc_id(i)

    def length(self, i: int) -> int:
        return int(self.offsets[int(i) + 1] - self.offsets[int(i)])

    def tokens(self, i: int) -> torch.LongTensor:
        """LM token ids of chunk i (what its KV cache was computed from), on the model's device."""
        s, e = int(self.offsets[int(i)]), int(self.offsets[int(i) + 1])
        return torch.from_numpy(np.asarray(self.tokens_flat[s:e], dtype=np.int64)).to(self.device)

    def memory_chunk(self, ids) -> torch.LongTensor:
        """Chunk of each memory id (memory i = token i of the flat token array)."""
        ids = torch.as_tensor(ids)
        idx = np.searchsorted(self.offsets, ids.clamp_min(0).cpu().numpy(), side="right") - 1
        return torch.from_numpy(idx).masked_fill_(torch.as_tensor(ids.cpu() < 0), -1).to(ids.device)

    # ---------------------------------------------------------------- KV caches
    def _need_kv(self):
        if self.kv_layers is None:
            raise ValueError(f"{self.folder} was built without KV caches (datastore.kv=false)")

    def _ids(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        out = [int(i) for i in ids if int(i) >= 0]
        for i in out:
            if i >= len(self):
                raise IndexError(f"chunk {i} out of range (datastore has {len(self)} chunks)")
        return out

    def _rows(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in ids])

    def kv(self, ids, dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) [1, kv_heads, Σ L, head_dim] of chunks ``ids`` (-1 skipped), concatenated
        in order, on the model's device in the model's dtype (or ``dtype``). Positions restart at 0 in
        every chunk (see module doc)."""
        self._need_kv()
        rows = self._rows(self._ids(ids))
        dtype = dtype or self.dtype
        out = []
        for arr in self.kv_layers:
            x = torch.from_numpy(np.asarray(arr[rows])).to(self.device, dtype)  # [T, 2, h, d]
            out.append((x[:, 0].transpose(0, 1).unsqueeze(0).contiguous(),
                        x[:, 1].transpose(0, 1).unsqueeze(0).contiguous()))
        return out

    def kv_cache(self, ids, dtype: Optional[torch.dtype] = None):
        """:meth:`kv` as a ``transformers.DynamicCache`` (batch 1)."""
        from transformers import DynamicCache

        return DynamicCache(self.kv(ids, dtype), config=self.lm.model.config)

    # ---------------------------------------------------------------- search
    def search(self, queries: list[str], k: int) -> ChunkHits:
        """Chunks for text queries (the text retriever); ``kv(hits.ids[i])`` gives their caches."""
        return self.text_store.search(queries, k)

    def search_vectors(self, q: torch.Tensor, k: int) -> ChunkHits:
        return self.text_store.search_vectors(q, k)

    def search_memories(self, q: torch.Tensor, k: int):
        """k nearest memories of hidden-state queries q [N, H]: (scores, ids, values [N, k, H]) on q's device.

        Scores are inner products (``memory_metric=ip``) or squared L2 distances; id -1 = none
        (score -inf / +inf, value 0).
        """
        if self.memory_index is None:
            raise ValueError(f"{self.folder} was built without memories (datastore.memories=false)")
        H = self.memory_keys.shape[1]
        if q.dim() != 2 or q.shape[1] != H:
            raise ValueError(f"memory queries must be [N, {H}], got {tuple(q.shape)}")
        k = min(int(k), self.memory_keys.shape[0])
        D, I = self.memory_index.search(np.ascontiguousarray(q.detach().float().cpu().numpy()), k)
        ids = torch.from_numpy(np.asarray(I, dtype=np.int64))
        scores = torch.from_numpy(np.asarray(D, dtype=np.float32))
        missing = ids < 0
        if missing.any():
            scores = scores.masked_fill(missing, float("inf") if self.memory_metric == "l2" else float("-inf"))
        flat = ids.clamp_min(0).flatten().numpy()
        order = np.argsort(flat, kind="stable")  # sorted reads from the memory map
        vals = np.empty((len(flat), H), dtype=np.float32)
        vals[order] = np.asarray(self.memory_values[flat[order]], dtype=np.float32)
        values = torch.from_numpy(vals).view(ids.shape[0], k, H)
        values[missing] = 0
        return scores.to(q.device), ids.to(q.device), values.to(q.device, q.dtype)

    def describe(self) -> dict[str, Any]:
        kv = self.manifest.get("kv")
        mem = self.manifest.get("memories")
        return {"unit": "latent", "size": len(self), "folder": str(self.folder),
                "index": " | ".join(x for x in [self.text_store.describe()["index"],
                                                type(self.memory_index).__name__ if self.memory_index else ""] if x),
                "bytes": folder_bytes(self.folder), "retriever": self.text_store.retriever,
                "tokens": int(self.offsets[-1]), "kv": bool(kv), "kv_dtype": kv["dtype"] if kv else None,
                "memories": bool(mem), "memory_layer": mem["layer"] if mem else None}

    # ---------------------------------------------------------------- load
    @classmethod
    def load(cls, folder: Path, lm, *, encoder=None, retriever: Optional[str] = None, index: Optional[IndexSpec] = None,
             memory_index: Optional[IndexSpec] = None, rrf_k=60, candidates=100, progress=False) -> "LatentDatastore":
        """Open a built folder: ``index`` searches the chunk texts (default exact inner product),
        ``memory_index`` the memories (default exact L2)."""
        folder = Path(folder)
        memory_index = memory_index if memory_index is not None else IndexSpec(metric="l2")
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "latent":
            raise DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not latent")
        base.check_model(manifest, lm, folder)
        text = ChunkDatastore.load(folder / "text", lm, encoder=encoder, retriever=retriever, index=index, rrf_k=rrf_k,
                                   candidates=candidates, progress=progress)
        mindex = None
        if manifest.get("memories"):
            keys = open_array(folder, manifest["memories"]["keys"])
            mindex = load_or_build_index(folder, keys, memory_index, progress=progress)
        return cls(folder, manifest, text, lm, memory_index=mindex, memory_metric=memory_index.metric)


# --------------------------------------------------------------------------- build
class _TokenSink:
    """Collects the LM token ids of every chunk (flat) while the chunks are written."""

    def __init__(self, tmp: Path, tokenizer, max_len: Optional[int]):
        self.tokens = NpyAppender(tmp / "chunk_tokens.npy", np.int32)
        self.offsets = NpyAppender(tmp / "chunk_token_offsets.npy", np.int64)
        self.offsets.append([0])
        self.total = 0
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, chunks) -> None:
        need = [c.text for c in chunks if c.token_ids is None]
        enc = iter(self.tokenizer(need, add_special_tokens=False)["input_ids"]) if need else iter(())
        ends = []
        for c in chunks:
            ids = c.token_ids if c.token_ids is not None else next(enc)
            if len(ids) == 0:
                raise ValueError(f"a chunk of row {c.row} has no LM tokens; use chunking=tokens")
            if self.max_len is not None and len(ids) > self.max_len:
                raise ValueError(f"a chunk of row {c.row} has {len(ids)} LM tokens, more than the model's "
                                 f"{self.max_len} positions; use chunking=tokens with a smaller chunk_size")
            self.tokens.append(ids)
            self.total += len(ids)
            ends.append(self.total)
        self.offsets.append(ends)

    def close(self) -> tuple[dict, dict]:
        return self.tokens.close(), self.offsets.close()


def write_latents(tmp: Path, lm, tokens: np.ndarray, offsets: np.ndarray, *, kv: bool, memories: bool,
                  memory_layer, memory_value_layer, kv_dtype: str, memory_dtype: str, batch_size: int,
                  progress: bool) -> dict:
    """Run the LM over every chunk alone (positions from 0) and stream KV caches / memories to disk.

    Chunks are processed in order and every array is appended sequentially to its file (not
    memory-mapped while writing), so resident memory stays at one batch whatever the corpus size.
    """
    model, dev = lm.model, lm.device
    n, T = len(offsets) - 1, int(offsets[-1])
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    key_cap = HiddenCapture(model, memory_layer) if memories else None
    val_cap = (HiddenCapture(model, memory_value_layer)
               if memories and memory_value_layer is not None and str(memory_value_layer) != str(memory_layer) else None)
    out: dict[str, Any] = {"kv": None, "memories": None}
    kv_files: list[NpyAppender] = []
    H = lm.hidden_size
    mem_keys = NpyAppender(tmp / "memory_keys.npy", memory_dtype, (H,)) if memories else None
    mem_vals = NpyAppender(tmp / "memory_values.npy", memory_dtype, (H,)) if val_cap is not None else None
    lengths = np.diff(offsets)
    it = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="latent (LM forward)", unit="batch", total=-(-n // batch_size))
    # the LM head (vocabulary logits) is skipped unless a memory reads its input
    reads_head = memories and any(str(x) in ("final", "lm_head", "None") for x in
                                  ((memory_layer, memory_value_layer) if val_cap is not None else (memory_layer,)))
    base_model = getattr(model, "base_model", None)
    runner = model if reads_head or base_model is None or base_model is model else base_model
    caps = [c for c in (key_cap, val_cap) if c is not None]
    for c in caps:
        c.attach()
    try:
        with torch.inference_mode():
            for b in it:
                sel = range(b, min(b + batch_size, n))
                L = int(lengths[sel.start:sel.stop].max())
                ids = torch.full((len(sel), L), pad, dtype=torch.long)
                mask = torch.zeros((len(sel), L), dtype=torch.long)
                for r, c in enumerate(sel):
                    x = np.asarray(tokens[offsets[c]:offsets[c + 1]], dtype=np.int64)
                    ids[r, :len(x)] = torch.from_numpy(x)
                    mask[r, :len(x)] = 1
                valid = mask.bool().view(-1)  # real tokens of the batch, in chunk order
                res = runner(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=kv)
                if kv:
                    layers = cache_layers(output_cache(res))
                    if not kv_files:
                        (tmp / "kv").mkdir()
                        kv_files = [NpyAppender(tmp / "kv" / f"layer{li:03d}.npy", kv_dtype,
                                                (2, kk.shape[1], kk.shape[3])) for li, (kk, _) in enumerate(layers)]
                    for f, (kk, vv) in zip(kv_files, layers):
                        both = torch.stack([kk, vv], 2).transpose(1, 3)  # [B, L, 2, h, d]
                        f.append(both.reshape(-1, *both.shape[2:])[valid.to(both.device)].float().cpu().numpy())
                if memories:
                    hk = key_cap.hidden
                    mem_keys.append(hk.reshape(-1, H)[valid.to(hk.device)].float().cpu().numpy())
                    if mem_vals is not None:
                        hv = val_cap.hidden
                        mem_vals.append(hv.reshape(-1, H)[valid.to(hv.device)].float().cpu().numpy())
    finally:
        for c in caps:
            c.detach()
    if kv:
        specs = []
        for li, f in enumerate(kv_files):
            spec = f.close()
            assert spec["shape"][0] == T, (spec, T)
            specs.append({**spec, "file": f"kv/layer{li:03d}.npy"})
        out["kv"] = {"layers": specs, "num_layers": len(specs), "kv_heads": specs[0]["shape"][2],
                     "head_dim": specs[0]["shape"][3], "dtype": kv_dtype,
                     "positions": "each chunk alone from position 0 (keys rotated for 0..L-1)"}
    if memories:
        keys = mem_keys.close()
        assert keys["shape"][0] == T, (keys, T)
        out["memories"] = {"layer": _layer_name(memory_layer),
                           "value_layer": _layer_name(memory_value_layer if val_cap is not None else memory_layer),
                           "keys": keys, "values": mem_vals.close() if mem_vals is not None else None,
                           "dtype": memory_dtype}
    return out


# --------------------------------------------------------------------------- build / merge
@dataclass
class LatentParams(ChunkParams):
    """``conf/datastore/latent.yaml``: the chunks (passage settings), what is kept of the LM's forward
    over each, and the memory index."""

    chunk_size: int = 64
    overlap: int = 0
    kv: bool = True
    memories: bool = True
    memory_layer: Union[int, str] = -2
    memory_value_layer: Union[int, str, None] = None
    kv_dtype: str = "float16"
    memory_dtype: str = "float16"
    memory_index_factory: str = "Flat"
    memory_metric: str = "l2"
    batch_size: int = 8                 # LM batch
    encoder_batch_size: int = 64


def _manifest(plan: Plan, lm, files, latents, timer, extra=None) -> dict:
    return {"format": base.FORMAT, "unit": "latent", "fingerprint": plan.fingerprint, "spec": plan.spec,
            "model": base.model_identity(lm), "size": files["size"], "tokens": files["tokens"],
            "chunk_tokens": files["chunk_tokens"], "chunk_token_offsets": files["chunk_token_offsets"],
            "text": "text", **latents, "build_seconds": round(timer.seconds, 2), **(extra or {})}


class LatentUnit(Unit):
    """The chunk texts are a chunk store in ``text/``; KV layers and memories sit next to it."""

    name = "latent"
    Params = LatentParams

    def plan(self, lm, corpus_ds, corpus_name, p, shard) -> Plan:
        if lm is None:
            raise ValueError("the latent datastore is built with the LM itself: a model is needed")
        if not p.kv and not p.memories:
            raise ValueError("latent datastore with kv=false and memories=false would hold nothing; enable one")
        for name, dt in (("kv_dtype", p.kv_dtype), ("memory_dtype", p.memory_dtype)):
            if dt not in ("float16", "float32"):
                raise ValueError(f"{name}={dt!r}: choose float16 or float32")
        if p.memories:
            from rcd.hooks import resolve_layer

            resolve_layer(lm.model, p.memory_layer)  # fails early on a bad layer
            if p.memory_value_layer is not None:
                resolve_layer(lm.model, p.memory_value_layer)
        parts = resolve_parts(lm, corpus_ds, corpus_name, p, shard)
        ident = base.model_identity(lm)
        mem = p.memories
        spec = {"unit": "latent", "entries": parts["entries_spec"], "model": ident["fingerprint"],
                "dtype": ident["dtype"], "tokenizer": ident["tokenizer"], "hidden_size": ident["hidden_size"],
                "kv": bool(p.kv), "kv_dtype": p.kv_dtype if p.kv else None, "memories": bool(mem),
                "memory_layer": _layer_name(p.memory_layer) if mem else None,
                "memory_value_layer": (_layer_name(p.memory_value_layer) if mem and p.memory_value_layer is not None
                                       else None), "memory_dtype": p.memory_dtype if mem else None}
        return Plan(spec, shard_label(corpus_name, shard), lm.name, shard, parts)

    def _text_params(self, p: LatentParams) -> LatentParams:
        """The chunk store of the texts is embedded with the encoder's batch, not the LM's."""
        import dataclasses

        return dataclasses.replace(p, batch_size=p.encoder_batch_size)

    def write(self, tmp, plan, p, lm, corpus_ds, progress) -> None:
        timer = base.Timer()
        sink = _TokenSink(tmp, lm.tokenizer, getattr(lm.model.config, "max_position_embeddings", None))
        write_chunk_store(tmp / "text", plan, self._text_params(p), lm, corpus_ds, progress, on_chunks=sink)
        tok_spec, off_spec = sink.close()
        tokens = open_array(tmp, tok_spec)
        offsets = np.asarray(open_array(tmp, off_spec))
        latents = write_latents(tmp, lm, tokens, offsets, kv=p.kv, memories=p.memories, memory_layer=p.memory_layer,
                                memory_value_layer=p.memory_value_layer, kv_dtype=p.kv_dtype,
                                memory_dtype=p.memory_dtype, batch_size=p.batch_size, progress=progress)
        del tokens
        files = {"size": len(offsets) - 1, "tokens": int(offsets[-1]), "chunk_tokens": tok_spec,
                 "chunk_token_offsets": off_spec}
        base.write_manifest(tmp, _manifest(plan, lm, files, latents, timer))

    def merge(self, tmp, plan, parts, p, lm, progress) -> None:
        """Text sub-folders, token arrays, KV layers and memories concatenated."""
        manifests = [base.read_manifest(q) for q in parts]
        timer = base.Timer()
        merge_chunk_store(tmp / "text", plan, [q / "text" for q in parts], p, lm, progress)
        tok_spec = concat_array(parts, [m["chunk_tokens"] for m in manifests], tmp)
        offs = NpyAppender(tmp / "chunk_token_offsets.npy", np.int64)
        offs.append([0])
        total = 0
        for q, m in zip(parts, manifests):
            o = np.asarray(open_array(q, m["chunk_token_offsets"]))
            offs.append(o[1:] + total)
            total += int(o[-1])
        off_spec = offs.close()
        latents: dict[str, Any] = {"kv": None, "memories": None}
        if p.kv:
            (tmp / "kv").mkdir()
            layer_specs = [concat_array(parts, [m["kv"]["layers"][li] for m in manifests], tmp)
                           for li in range(manifests[0]["kv"]["num_layers"])]
            latents["kv"] = {**manifests[0]["kv"], "layers": layer_specs}
        if p.memories:
            mem = dict(manifests[0]["memories"])
            mem["keys"] = concat_array(parts, [m["memories"]["keys"] for m in manifests], tmp)
            if mem.get("values"):
                mem["values"] = concat_array(parts, [m["memories"]["values"] for m in manifests], tmp)
            latents["memories"] = mem
        files = {"size": sum(m["size"] for m in manifests), "tokens": total, "chunk_tokens": tok_spec,
                 "chunk_token_offsets": off_spec}
        base.write_manifest(tmp, _manifest(plan, lm, files, latents, timer, {"merged_from": [q.name for q in parts]}))

    def load(self, folder, plan, p, lm, progress, **extra) -> LatentDatastore:
        return LatentDatastore.load(folder, lm, encoder=plan.parts["encoder"], index=p.index_spec(),
                                    memory_index=p.index_spec("memory_"), rrf_k=p.rrf_k, candidates=p.candidates,
                                    progress=progress)


UNIT = LatentUnit()
build_or_load = UNIT.build_or_load
merge_shards = UNIT.merge_shards
