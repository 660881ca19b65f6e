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
from rcd.datastore.base import NpyAppender
from rcd.datastore.index import load_or_build_index
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

    @classmethod
    def build(cls, lm, texts: list[str], folder: Path, spec: dict, *, layer="final", max_tokens=None,
              window: int = 512, stride: Optional[int] = None, batch_size: int = 8, key_dtype: str = "float16",
              progress: bool = True) -> Path:
        """Encode ``texts`` and write keys/values/manifest into ``folder`` atomically."""
        stride = stride or window
        if key_dtype not in ("float16", "float32"):
            raise ValueError(f"key_dtype={key_dtype!r}: choose float16 or float32")
        timer = base.Timer()
        docs = _tokenize_docs(lm.tokenizer, texts)
        plans, total = plan_windows([len(d) for d in docs], window, stride, max_tokens)
        if total == 0:
            raise ValueError("the corpus is empty after tokenization: nothing to put in the datastore")
        H = lm.hidden_size
        model, dev = lm.model, lm.device
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        encoder = KeyEncoder(model, layer)
        it = range(0, len(plans), batch_size)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="datastore tokens", unit="batch")
        with base.atomic_folder(folder) as tmp:
            # streamed to disk in order (no write-time memory map: resident memory is one batch)
            keys = NpyAppender(tmp / "keys.npy", key_dtype, (H,))
            vals = NpyAppender(tmp / "values.npy", np.int32)
            where = NpyAppender(tmp / "positions.npy", np.int64, (2,))
            w = 0
            with torch.inference_mode():
                for b in it:
                    chunk = plans[b:b + batch_size]
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
            manifest = {
                "format": base.FORMAT, "unit": "tokens", "fingerprint": folder.name.rsplit("-", 1)[-1],
                "spec": spec, "model": base.model_identity(lm), "layer": str(layer), "size": total,
                "documents": len(docs), "window": window, "stride": stride,
                "keys": base.array_spec("keys.npy", (total, H), key_dtype),
                "values": base.array_spec("values.npy", (total,), np.int32),
                "positions": base.array_spec("positions.npy", (total, 2), np.int64),
                "build_seconds": round(timer.seconds, 2), "tokens_per_second": round(total / timer.seconds, 1),
            }
            base.write_manifest(tmp, manifest)
        log.info("built token datastore %s: %d entries in %.1fs", folder, total, timer.seconds)
        return folder

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, folder: Path, lm, *, index_factory: str = "Flat", metric: str = "l2", nprobe: int = 32,
             ef_search: int = 128, use_gpu: Optional[bool] = None, rerank: bool = False, index_ondisk: bool = False,
             map_fn=None) -> "TokenDatastore":
        """Open a built folder. ``index_ondisk``: an IVF index with its lists on disk, filled one block per
        shard of a merged build (``map_fn`` fills them in parallel, e.g. as Ray tasks)."""
        folder = Path(folder)
        manifest = base.read_manifest(folder)
        if manifest.get("unit") != "tokens":
            raise base.DatastoreError(f"{folder} holds a {manifest.get('unit')!r} datastore, not tokens")
        base.check_model(manifest, lm, folder)
        keys = base.open_array(folder, manifest["keys"])
        values = base.open_array(folder, manifest["values"])
        index = load_or_build_index(folder, keys, index_factory, metric, nprobe=nprobe, ef_search=ef_search,
                                    use_gpu=use_gpu, ondisk=bool(index_ondisk), keys_spec=manifest["keys"],
                                    bounds=manifest.get("shard_key_starts"), map_fn=map_fn)
        return cls(folder, manifest, keys, values, index, metric, lm.device, rerank=rerank)

    # ---------------------------------------------------------------- text around an entry
    def context(self, i: int, before: int, after: int) -> list[int]:
        """Token ids of the corpus around entry ``i``: the ``before`` tokens up to and including its value
        (the token after its key position) and ``after`` tokens more, within its document."""
        if getattr(self, "_positions", None) is None:
            self._positions = base.open_array(self.folder, self.manifest["positions"])
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
                "bytes": sum(p.stat().st_size for p in self.folder.rglob("*") if p.is_file())}


def build_or_load(lm, corpus_ds, corpus_name: str, root: Path, *, layer="final", max_tokens=100_000, window=512,
                  stride=None, batch_size=8, key_dtype="float16", index_factory="Flat", metric="l2", nprobe=32,
                  ef_search=128, use_gpu=None, rerank=False, index_ondisk=False, progress=True,
                  **unused) -> TokenDatastore:
    """Reuse the datastore with the same fingerprint under ``root`` or build it."""
    from rcd.corpus import fingerprint as corpus_fingerprint

    if len(corpus_ds) == 0:
        raise ValueError(f"corpus {corpus_name!r} is empty: nothing to build a datastore from")
    stride = stride or window
    spec = TokenDatastore.spec(lm, corpus_name, corpus_fingerprint(corpus_ds), layer, max_tokens, window, stride,
                               key_dtype)
    fp = base.fingerprint(spec)
    folder = base.find_existing(root, fp)
    if folder is None:
        folder = Path(root) / base.folder_name("tokens", corpus_name, lm.name, fp)
        TokenDatastore.build(lm, list(corpus_ds["text"]), folder, spec, layer=layer, max_tokens=max_tokens,
                             window=window, stride=stride, batch_size=batch_size, key_dtype=key_dtype,
                             progress=progress)
    return TokenDatastore.load(folder, lm, index_factory=index_factory, metric=metric, nprobe=nprobe,
                               ef_search=ef_search, use_gpu=use_gpu, rerank=rerank, index_ondisk=index_ondisk)
