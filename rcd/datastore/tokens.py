"""Token datastore (the "what = tokens" unit, as in kNN-LM).

Entry i is a pair (k_i, v_i): k_i = the hidden state of the LM at position t of a corpus
document (by default the vector that feeds the LM head, ``layer=final``) and v_i = the token at
position t+1. Documents are read in windows of ``window`` tokens advancing by ``stride``; each
window contributes keys for its last ``stride`` positions, so every key sees at least
``window - stride`` tokens of left context (stride = window: no overlap, fastest).

Search returns, for query vectors q [N, H], the k nearest keys' distances (squared L2, or inner
products for ``metric=ip``) and their next tokens, as tensors on the queries' device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rcd.datastore import base
from rcd.datastore.index import IndexSpec, load_or_build_index
from rcd.datastore.shards import shard_label, shard_rows
from rcd.datastore.storage import DatastoreError, NpyAppender, array_spec, concat_array, folder_bytes, open_array
from rcd.datastore.unit import Plan, Unit, UnitParams
from rcd.hooks import KeyEncoder

log = logging.getLogger(__name__)


@dataclass
class Neighbours:
    """k nearest entries for N queries: scores [N,k] (distance or similarity), ids [N,k], tokens [N,k]."""

    scores: torch.Tensor
    ids: torch.Tensor
    tokens: torch.Tensor
    metric: str


def _tokenize_docs(tokenizer, texts: list[str], batch: int = 64) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(texts), batch):
        enc = tokenizer(texts[s:s + batch], add_special_tokens=False)["input_ids"]
        out.extend(enc)
    return out


def plan_windows(doc_lengths: list[int], window: int, stride: int, max_tokens: Optional[int]):
    """Windows (doc, ctx_start, key_start, key_end) covering every position with a next token.

    Keys are written for positions [key_start, key_end) of the document; the model sees
    tokens [ctx_start, key_end]. Stops once ``max_tokens`` keys are planned.
    """
    if not 1 <= stride <= window:
        raise ValueError(f"datastore stride={stride} must be between 1 and window={window}")
    plans, total = [], 0
    for d, n in enumerate(doc_lengths):
        last = n - 1  # positions 0..n-2 have a next token
        s = 0
        while s < last:
            e = min(s + stride, last)
            if max_tokens is not None and total + (e - s) > max_tokens:
                e = s + (max_tokens - total)
            if e > s:
                plans.append((d, max(0, e - window), s, e))
                total += e - s
            if max_tokens is not None and total >= max_tokens:
                return plans, total
            s = e
    return plans, total


class TokenDatastore:
    """kNN-LM datastore: keys = hidden states at t, values = tokens at t+1 (see module doc)."""

    unit = "tokens"

    def __init__(self, folder: Path, manifest: dict, keys: np.ndarray, values: np.ndarray, index,
                 metric: str, device: torch.device, rerank: bool = False):
        self.folder = Path(folder)
        self.manifest = manifest
        self.keys = keys
        self.values_np = values
        self.values = torch.from_numpy(np.asarray(values, dtype=np.int64)).to(device)
        self.index = index
        self.metric = metric
        self.device = device
        self.rerank = rerank

    def __len__(self) -> int:
        return int(self.manifest["size"])

    # ------------------------------------------------------------------ build
    @staticmethod
    def spec(lm, corpus_name: str, corpus_fp: str, layer, max_tokens, window, stride, key_dtype) -> dict:
        ident = base.model_identity(lm)
        return {"unit": "tokens", "corpus": corpus_fp, "corpus_name": corpus_name, "model": ident["fingerprint"],
                "dtype": ident["dtype"], "tokenizer": ident["tokenizer"], "hidden_size": ident["hidden_size"], "layer": str(layer),
                "max_tokens": max_tokens, "window": window, "stride": stride, "key_dtype": key_dtype}

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, folder: Path, lm, *, index: Optional[IndexSpec] = None, rerank: bool = False,
             map_fn=None) -> "TokenDatastore":
        """Open a built folder (``index``: default exact L2). An on-disk index (``index.ondisk``) is an IVF
        index with its lists on disk, filled one block per shard of a merged build (``map_fn`` fills them
        in parallel, e.g. as Ray tasks)."""
        folder = Path(folder)
        index = index if index is not None else IndexSpec()
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "tokens":
            raise DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not tokens")
        base.check_model(manifest, lm, folder)
        keys = open_array(folder, manifest["keys"])
        values = open_array(folder, manifest["values"])
        faiss_index = load_or_build_index(folder, keys, index, keys_spec=manifest["keys"],
                                          bounds=manifest.get("shard_key_starts"), map_fn=map_fn)
        return cls(folder, manifest, keys, values, faiss_index, index.metric, lm.device, rerank=rerank)

    # ---------------------------------------------------------------- text around an entry
    def context(self, i: int, before: int, after: int) -> list[int]:
        """Token ids of the corpus around entry ``i``: the ``before`` tokens up to and including its value
        (the token after its key position) and ``after`` tokens more, within its document."""
        if getattr(self, "_positions", None) is None:
            self._positions = open_array(self.folder, self.manifest["positions"])
        pos, n = self._positions, len(self)
        doc = int(pos[int(i)][0])
        lo, hi = int(i), int(i)
        while lo > 0 and int(i) - lo < before - 1 and int(pos[lo - 1][0]) == doc and int(pos[lo - 1][1]) == int(pos[lo][1]) - 1:
            lo -= 1
        while hi + 1 < n and hi - int(i) < after and int(pos[hi + 1][0]) == doc and int(pos[hi + 1][1]) == int(pos[hi][1]) + 1:
            hi += 1
        return [int(x) for x in np.asarray(self.values_np[lo:hi + 1])]

    # ---------------------------------------------------------------- search
    def search(self, queries: torch.Tensor, k: int) -> Neighbours:
        """k nearest keys of each query row [N, H] (batched; one FAISS call)."""
        if queries.dim() != 2 or queries.shape[1] != self.keys.shape[1]:
            raise ValueError(f"queries must be [N, {self.keys.shape[1]}], got {tuple(queries.shape)}")
        k = min(int(k), len(self))
        q = queries.detach().to(torch.float32).cpu().numpy()
        D, I = self.index.search(np.ascontiguousarray(q), k)
        ids = torch.from_numpy(I).to(queries.device)
        scores = torch.from_numpy(D).to(queries.device)
        missing = ids < 0
        if missing.any():  # approximate indexes can return fewer than k hits
            scores = scores.masked_fill(missing, float("inf") if self.metric == "l2" else float("-inf"))
        if self.rerank:
            scores = self._exact_scores(q, I, scores)
        tokens = self.values[ids.clamp_min(0).to(self.values.device)].to(queries.device)
        return Neighbours(scores=scores, ids=ids, tokens=tokens, metric=self.metric)

    def _exact_scores(self, q: np.ndarray, I: np.ndarray, approx: torch.Tensor, block: int = 64) -> torch.Tensor:
        """Exact distances (or inner products) of the returned hits, from the stored keys.

        Compressed indexes (PQ, SQ) return approximate distances; kNN-LM puts them in a softmax,
        so re-scoring the k hits with the real keys keeps p_kNN equal to exact search on the
        same neighbours. Reads N·k keys from the memory-mapped key file.
        """
        out = approx.clone()
        for s in range(0, I.shape[0], block):
            ii = I[s:s + block]
            valid = ii >= 0
            flat = np.where(valid, ii, 0).reshape(-1)
            order = np.argsort(flat, kind="stable")  # sorted reads are kinder to the page cache
            k = np.empty((flat.size, self.keys.shape[1]), dtype=np.float32)
            k[order] = self.keys[flat[order]]
            k = k.reshape(ii.shape[0], ii.shape[1], -1)
            qq = q[s:s + block, None, :]
            exact = ((k - qq) ** 2).sum(-1) if self.metric == "l2" else (k * qq).sum(-1)
            exact = np.where(valid, exact, np.inf if self.metric == "l2" else -np.inf)
            out[s:s + block] = torch.from_numpy(exact.astype(np.float32)).to(out.device)
        return out

    def _ondisk(self) -> bool:
        try:
            import faiss

            ivf = faiss.try_extract_index_ivf(self.index)
            return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
        except (ImportError, AttributeError, TypeError):
            return False

    def describe(self) -> dict[str, Any]:
        return {"unit": "tokens", "size": len(self), "folder": str(self.folder),
                "index": type(self.index).__name__, "metric": self.metric,
                "index_ondisk": self._ondisk(),
                "bytes": folder_bytes(self.folder)}


# --------------------------------------------------------------------------- build / merge
@dataclass
class TokenParams(UnitParams):
    """``conf/datastore/tokens.yaml``: which hidden states become keys, and the index over them."""

    layer: Any = "final"
    max_tokens: Optional[int] = 100_000
    window: int = 512
    stride: Optional[int] = None
    batch_size: int = 8
    key_dtype: str = "float16"
    index_factory: str = "Flat"
    metric: str = "l2"
    nprobe: int = 32
    ef_search: int = 128
    use_gpu: Optional[bool] = None
    rerank: bool = False
    index_ondisk: bool = False


def write_tokens(tmp: Path, plan: Plan, p: TokenParams, lm, progress: bool) -> None:
    """Encode the plan's documents and stream keys / values / positions and the manifest into ``tmp``."""
    window, stride, key_dtype, layer = p.window, p.stride or p.window, p.key_dtype, p.layer
    timer = base.Timer()
    docs = _tokenize_docs(lm.tokenizer, list(plan.parts["corpus"]["text"]))
    plans, total = plan_windows([len(d) for d in docs], window, stride, p.max_tokens)
    if total == 0:
        raise ValueError("the corpus is empty after tokenization: nothing to put in the datastore")
    H = lm.hidden_size
    model, dev = lm.model, lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    encoder = KeyEncoder(model, layer)
    it = range(0, len(plans), p.batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="datastore tokens", unit="batch")
    # streamed to disk in order (no write-time memory map: resident memory is one batch)
    keys = NpyAppender(tmp / "keys.npy", key_dtype, (H,))
    vals = NpyAppender(tmp / "values.npy", np.int32)
    where = NpyAppender(tmp / "positions.npy", np.int64, (2,))
    w = 0
    with torch.inference_mode():
        for b in it:
            chunk = plans[b:b + p.batch_size]
            seqs = [docs[d][c:e] for d, c, s, e in chunk]  # tokens ctx_start..key_end-1
            L = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), L), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for i, x in enumerate(seqs):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            hid = encoder(ids.to(dev), mask.to(dev)).float().cpu().numpy()
            for i, (d, c, s, e) in enumerate(chunk):
                n = e - s
                keys.append(hid[i, s - c:e - c])
                vals.append(docs[d][s + 1:e + 1])
                where.append(np.stack([np.full(n, d, dtype=np.int64), np.arange(s, e)], axis=1))
                w += n
    assert w == total, (w, total)
    for a in (keys, vals, where):
        a.close()
    base.write_manifest(tmp, {
        "format": base.FORMAT, "unit": "tokens", "fingerprint": plan.fingerprint,
        "spec": plan.spec, "model": base.model_identity(lm), "layer": str(layer), "size": total,
        "documents": len(docs), "window": window, "stride": stride,
        "keys": array_spec("keys.npy", (total, H), key_dtype),
        "values": array_spec("values.npy", (total,), np.int32),
        "positions": array_spec("positions.npy", (total, 2), np.int64),
        "build_seconds": round(timer.seconds, 2), "tokens_per_second": round(total / timer.seconds, 1),
    })


def merge_tokens(tmp: Path, plan: Plan, parts: list[Path], p: TokenParams, lm) -> None:
    """Concatenate the shards' keys / values / positions (document ids shifted to the whole corpus)."""
    timer = base.Timer()
    n_rows, n = len(plan.parts["corpus"]), len(parts)
    manifests = [base.read_manifest(q) for q in parts]
    row_starts = [shard_rows(n_rows, (i, n)).start for i in range(n)]
    keys = concat_array(parts, [m["keys"] for m in manifests], tmp)
    values = concat_array(parts, [m["values"] for m in manifests], tmp)
    positions = concat_array(parts, [m["positions"] for m in manifests], tmp, shift=row_starts, column=0)
    total = keys["shape"][0]
    seconds = sum(m.get("build_seconds", 0) for m in manifests) + timer.seconds
    stride = p.stride or p.window
    base.write_manifest(tmp, {
        "format": base.FORMAT, "unit": "tokens", "fingerprint": plan.fingerprint, "spec": plan.spec,
        "model": base.model_identity(lm), "layer": str(p.layer), "size": total, "documents": n_rows,
        "window": p.window, "stride": stride, "keys": keys, "values": values, "positions": positions,
        "build_seconds": round(seconds, 2), "tokens_per_second": round(total / max(seconds, 1e-9), 1),
        "merged_from": [q.name for q in parts],
        "shard_key_starts": list(np.cumsum([0] + [m["size"] for m in manifests[:-1]]).tolist()),
    })


class TokenUnit(Unit):
    """Shards select corpus rows before the build; a merge concatenates keys/values/positions and, with
    ``index_ondisk=true``, fills an on-disk IVF index one block per shard (``map_fn``: in parallel)."""

    name = "tokens"
    Params = TokenParams

    def plan(self, lm, corpus_ds, corpus_name, p, shard) -> Plan:
        from rcd.corpus import fingerprint as corpus_fingerprint

        if p.key_dtype not in ("float16", "float32"):
            raise ValueError(f"key_dtype={p.key_dtype!r}: choose float16 or float32")
        rows = corpus_ds if shard is None else corpus_ds.select(shard_rows(len(corpus_ds), shard))
        label = shard_label(corpus_name, shard)
        spec = TokenDatastore.spec(lm, label, corpus_fingerprint(rows), p.layer, p.max_tokens, p.window,
                                   p.stride or p.window, p.key_dtype)
        return Plan(spec, label, lm.name, shard, {"corpus": rows})

    def check_merge(self, p) -> None:
        if p.max_tokens is not None:
            raise ValueError("merging token shards needs datastore.max_tokens=null: a cap applies to each shard "
                             "separately, so the merge would differ from an unsharded build")

    def write(self, tmp, plan, p, lm, corpus_ds, progress) -> None:
        write_tokens(tmp, plan, p, lm, progress)

    def merge(self, tmp, plan, parts, p, lm, progress) -> None:
        merge_tokens(tmp, plan, parts, p, lm)

    def load(self, folder, plan, p, lm, progress, map_fn=None) -> TokenDatastore:
        return TokenDatastore.load(folder, lm, index=p.index_spec(), rerank=p.rerank, map_fn=map_fn)


UNIT = TokenUnit()
build_or_load = UNIT.build_or_load
merge_shards = UNIT.merge_shards
