"""Scoring a fixed text under a strategy: the one perplexity path (:class:`Scorer`) every task uses.

The text's tokens x_0..x_{n-1} are read in windows of ``window`` tokens advancing by ``stride``
(:func:`windows`); each window scores only the targets not scored before. Schedule steps are global
positions (position p predicts x_{p+1}; step p's last token is x_p). At every firing position the
query is the last ``query_tokens`` tokens up to x_p, and the evidence holds until the next firing
position (In-Context RALM with stride s for ``every_n``). Adaptive decides on the plain model's
p_t (the scored text is fixed, so there is no "generated with retrieval" p_t). A text query needs
``min_query_tokens`` tokens: a firing position before ``min_query_tokens - 1`` is moved to that
position; positions without evidence keep the plain NLL.

The control says how it scores (:mod:`rcd.control.base`): ``score_window(scorer, win)`` turns one
window's plain logits into its NLL (kNN-LM, tag bias, any logits control; the control's hooks are
attached during the plain pass unless it ``acts_in_forward``), and ``score_after(scorer)`` gives
every position's NLL after the plain pass (passages in the prompt, REPLUG views, an injected KV
prefix, memories in the forward). The helpers below (:meth:`Scorer.segments`,
:meth:`Scorer.view_logprobs`) do the searching and the batched forwards for it.

    PPL = exp(mean_t NLL_t)       bits/byte = Σ_t NLL_t / (ln 2 · bytes of the scored text)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch



@dataclass
class PerplexityResult:
    nll_none: np.ndarray  # per scored token, nats
    nll: Optional[np.ndarray]  # with the strategy (None for the plain model)
    n_bytes: int
    seconds_none: float
    seconds: float
    fired: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def pool(cls, parts: list["PerplexityResult"]) -> "PerplexityResult":
        """Several texts' results as one: their tokens, bytes, seconds and firings together."""
        if len(parts) == 1:
            return parts[0]
        ctl = [p.nll for p in parts]
        return cls(nll_none=np.concatenate([p.nll_none for p in parts]),
                   nll=None if any(x is None for x in ctl) else np.concatenate(ctl),
                   n_bytes=sum(p.n_bytes for p in parts), seconds_none=sum(p.seconds_none for p in parts),
                   seconds=sum(p.seconds for p in parts), fired=sum(p.fired for p in parts),
                   extra={"parts": len(parts)})

    @staticmethod
    def ppl(nll: np.ndarray) -> float:
        return float(math.exp(float(np.mean(nll))))

    def summary(self) -> dict:
        out = {"tokens": int(len(self.nll_none)), "bytes": self.n_bytes,
               "perplexity_none": self.ppl(self.nll_none),
               "bits_per_byte_none": float(self.nll_none.sum() / math.log(2) / max(1, self.n_bytes))}
        if self.nll is not None:
            out.update({"perplexity": self.ppl(self.nll),
                        "bits_per_byte": float(self.nll.sum() / math.log(2) / max(1, self.n_bytes)),
                        "relative_change": self.ppl(self.nll) / self.ppl(self.nll_none) - 1.0,
                        "retrieval_rate": self.fired / max(1, len(self.nll))})
        return out


def windows(n: int, window: int, stride: int):
    """(begin, end, first) triples: positions [first, end-1) of ids[begin:end] predict their next token.

    Targets are scored in chunks of ``stride`` (capped at window-1, since a target's previous token
    must be in the window); the first chunk takes window-1 targets. Every target 1..n-1 is scored
    exactly once, with at least ``window - stride`` tokens of context after the first window.
    """
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"perplexity window={window} must be >= 2 and stride={stride} between 1 and window")
    stride = min(stride, window - 1)
    out, t0 = [], 1
    t1 = min(window, n)
    while t0 < n:
        out.append((max(0, t1 - window), t1, t0 - 1))
        t0, t1 = t1, min(t1 + stride, n)
    return out


@dataclass
class Window:
    """One window of the plain pass: positions [first, end-1) of ids[begin:end] are scored here."""

    begin: int
    end: int
    first: int
    logits: torch.Tensor  # [end-1-first, vocab] plain logits of the scored positions
    targets: torch.Tensor  # [end-1-first] the tokens they predict
    nll_none: torch.Tensor  # [end-1-first] float64, CPU
    fires: list[int]  # global positions of this window where retrieval fires

    def rows(self, a: int, b: int) -> slice:
        """The rows of positions [a, b)."""
        return slice(a - self.first, b - self.first)


class Scorer:
    """NLL of one text plain and under the engine's strategy (module doc)."""

    phase = "score"

    def __init__(self, engine, token_ids: torch.Tensor, *, window: int = 512, stride: int = 256) -> None:
        if not 1 <= stride <= window:
            raise ValueError(f"perplexity stride={stride} must be between 1 and window={window}")
        self.engine = engine
        self.control = engine.control
        self.template = engine.template
        self.ids = token_ids.to(engine.device).view(-1)
        self.ids_cpu = self.ids.cpu()
        self.n = self.ids.numel()
        if self.n < 2:
            raise ValueError("the evaluation text has fewer than 2 tokens: nothing to score")
        self.window, self.stride = int(window), int(stride)
        self.cost = engine.new_cost()
        self.fires: list[int] = []
        self.extra: dict = {}
        self.nll_none = torch.zeros(self.n - 1, dtype=torch.float64)
        # the evidence surface a control shares with generation (one row, one view)
        self.B, self.n_views = 1, 1
        self.passages: list[list] = [[]]
        self.has_evidence = torch.zeros(1, dtype=torch.bool)
        self.step_no = 0

    def windows(self) -> list[tuple[int, int, int]]:
        """The (begin, end, first) windows of this text (:func:`windows`)."""
        return windows(self.n, self.window, self.stride)

    # ---------------------------------------------------------------- evidence
    def query_at(self, p: int) -> str:
        """The text query at position p: the last ``query_tokens`` tokens up to x_p."""
        e = self.engine
        return e.decode(self.ids_cpu[max(0, p + 1 - e.query_tokens):p + 1].tolist())

    def search_at(self, positions: list[int]):
        """One text search with the query at each of ``positions`` (provenance logged); the hits."""
        queries = [self.query_at(p) for p in positions]
        hits = self.engine.search(queries, self.cost)
        self.engine.log_hits(hits, [0] * len(positions), queries, None, [], positions=list(positions))
        return hits

    def retrieve(self, rows: list[int], sentences=None):
        """Search with the query at the current position (``step_no``)."""
        return self.search_at([self.step_no] * len(rows))

    def query_ids(self, row: int = 0, position: Optional[int] = None) -> list[int]:
        """The last ``query_tokens`` token ids up to x_p (p: ``position``, default the current one)."""
        p = self.step_no if position is None else position
        return self.ids_cpu[max(0, p + 1 - self.engine.query_tokens):p + 1].tolist()

    def count_retrieval(self, rows: list[int], labels: list[list[str]], seconds: float) -> None:
        self.cost["retrievals"] += len(rows)
        self.cost["retrieval_s"] += seconds

    def record(self, row: int, **fields) -> None:
        e = self.engine
        rec = {"task": e.task, "strategy": e.name, "control": e.control_name, "phase": "score", "id": None,
               "row": int(row), "step": self.step_no}
        rec.update(fields)
        e.provenance.append(rec)

    def segments(self, batch: int = 64, search: Optional[Callable] = None) -> list[tuple[int, int, list]]:
        """(a, b, passages): the passages retrieved at firing position a, which hold for positions [a, b)
        (until the next firing position); segments without passages are left out (plain NLL).
        ``search(positions) -> passages per position`` (default: a text search, rows made passages by
        the control's :meth:`~rcd.control.base.Control.passages`), asked ``batch`` positions at a time."""
        if search is None:
            def search(ps):
                hits = self.search_at(ps)
                return [self.control.passages(self, hits, j) for j in range(len(ps))]
        fires = self.fires
        found: list = []
        for s0 in range(0, len(fires), batch):
            found.extend(search(fires[s0:s0 + batch]))
        bounds = [(p, fires[i + 1] if i + 1 < len(fires) else self.n - 1) for i, p in enumerate(fires)]
        return [(a, b, ps) for (a, b), ps in zip(bounds, found) if a < b and ps]

    # ---------------------------------------------------------------- forwards after the plain pass
    def blocks_for(self, a: int, b: int, prefix: list[int], window: int) -> list[dict]:
        """Blocks scoring positions [a, b) (position p predicts ids[p+1]) after ``prefix`` tokens."""
        budget = window - len(prefix)
        size = max(1, min(self.stride, budget))
        blocks = []
        for c0 in range(a, b, size):
            c1 = min(c0 + size, b)
            s0 = max(0, c1 - budget)
            blocks.append({"seq": list(prefix) + self.ids_cpu[s0:c1].tolist(),
                           "targets": self.ids_cpu[c0 + 1:c1 + 1].tolist(), "positions": (c0, c1)})
        return blocks

    def view_logprobs(self, views: list[dict], kv_prefix: Optional[Callable] = None, batch: int = 4
                      ) -> list[torch.Tensor]:
        """log p(x_{p+1}) for p in [a, b) of each view ``{a, b, prefix, kv, room}``: the text follows
        ``prefix`` token ids (and an injected KV prefix of entries ``kv``, built by
        ``kv_prefix(list of kv per row, cost)``); ``room``: tokens of prefix + text per forward
        (default the window). Returns one float64 tensor [b - a] per view."""
        blocks, owner = [], []
        for vi, v in enumerate(views):
            for blk in self.blocks_for(v["a"], v["b"], list(v.get("prefix") or []), int(v.get("room") or self.window)):
                blk["kv"] = v.get("kv")
                owner.append(vi)
                blocks.append(blk)
        lps: list[Optional[torch.Tensor]] = [None] * len(blocks)
        order = sorted(range(len(blocks)), key=lambda i: (str(blocks[i]["kv"]), len(blocks[i]["seq"])))
        e = self.engine
        for s0 in range(0, len(order), batch):
            idx = order[s0:s0 + batch]
            prefix = None
            if any(blocks[i]["kv"] for i in idx):
                prefix = kv_prefix([blocks[i]["kv"] or [] for i in idx], self.cost)
            keep = max(len(blocks[i]["targets"]) for i in idx)
            res, _, _ = e.forward_padded([blocks[i]["seq"] for i in idx], self.cost, prefix=prefix, keep=keep)
            lp_all = torch.log_softmax(res.logits.float(), -1)
            for j, i in enumerate(idx):
                tg = torch.tensor(blocks[i]["targets"], device=lp_all.device)
                lps[i] = lp_all[j, keep - len(tg):].gather(1, tg.view(-1, 1)).squeeze(1).cpu()
        out = [torch.zeros(v["b"] - v["a"], dtype=torch.float64) for v in views]
        for vi, blk, lp in zip(owner, blocks, lps):
            c0, c1 = blk["positions"]
            a = views[vi]["a"]
            out[vi][c0 - a:c1 - a] = lp.double()
        return out

    def combined_logprobs(self, groups: list[dict], combine: Callable[[list[torch.Tensor]], torch.Tensor],
                          batch: int = 4) -> list[torch.Tensor]:
        """log p'(x_{p+1}) for p in [a, b) of each group ``{a, b, views: [{prefix}, ...]}``, where
        ``p' = combine([logits of view 1, view 2, ...])``: the views' full next-token logits [m, V] at the
        same positions, each view reading its ``prefix`` token ids then the text (as much of it as fits the
        window after the longest prefix of the group, the same text for every view), and ``combine`` returning
        normalised log-probabilities [m, V]. The public hook for controls that mix several views' whole
        distributions (Context-Aware Decoding, contrastive decoding); :meth:`view_logprobs` is the cheaper
        path when only each view's target log-probability is needed. Returns one float64 tensor [b - a] per
        group. Forwards: one per block per view, ``batch`` blocks at a time."""
        out = []
        e = self.engine
        for g in groups:
            a, b, views = int(g["a"]), int(g["b"]), list(g["views"])
            if not views:
                raise ValueError("Scorer.combined_logprobs: a group needs at least one view")
            prefixes = [list(v.get("prefix") or []) for v in views]
            budgets = [self.window - len(px) for px in prefixes]
            if min(budgets) < 2:
                raise ValueError(f"Scorer.combined_logprobs: a prefix of {max(map(len, prefixes))} tokens leaves no "
                                 f"room for text in the window of {self.window}")
            size = max(1, min(self.stride, min(budgets)))
            res = torch.zeros(b - a, dtype=torch.float64)
            blocks = [(c0, min(c0 + size, b)) for c0 in range(a, b, size)]
            for s0 in range(0, len(blocks), batch):
                chunk = blocks[s0:s0 + batch]
                seqs, keep = [], max(c1 - c0 for c0, c1 in chunk)
                for c0, c1 in chunk:
                    text = self.ids_cpu[max(0, c1 - min(budgets)):c1].tolist()  # the same text in every view
                    seqs += [px + text for px in prefixes]
                fw, _, _ = e.forward_padded(seqs, self.cost, keep=keep)
                logits = fw.logits.float()
                for j, (c0, c1) in enumerate(chunk):
                    m = c1 - c0
                    per_view = [logits[j * len(views) + v, keep - m:] for v in range(len(views))]
                    lp = combine(per_view)
                    tg = self.ids[c0 + 1:c1 + 1].to(lp.device)
                    res[c0 - a:c1 - a] = lp.gather(1, tg.view(-1, 1)).squeeze(1).double().cpu()
            out.append(res)
        return out

    # ---------------------------------------------------------------- the pass
    def _fires(self, first: int, end: int, probs, pending: bool) -> tuple[list[int], bool]:
        sched, e = self.engine.schedule, self.engine
        text_query = self.control is not None and not self.control.retrieves_itself
        local = []
        for p in range(first, end - 1):
            f = bool(sched.should_fire(p, None if probs is None else probs[p - first:p - first + 1],
                                       self.ids_cpu[p].view(1) if p > 0 else None)[0])
            if f or (pending and p == e.min_query_tokens - 1):
                local.append(p)
                pending = False
            if f and p < e.min_query_tokens - 1 and text_query:  # the query would be too short: defer
                local.pop()
                pending = True
        return local, pending

    def run(self):
        from rcd.engine.core import EngineError

        e, c, model = self.engine, self.control, self.engine.model
        t_wall = time.perf_counter()
        sched = e.schedule if c is not None else None
        if sched is not None:
            sched.reset(1, device=torch.device("cpu"))
        if c is not None and c.score_refusal:
            raise EngineError(c.score_refusal)
        if c is not None:
            c.begin(self)
        nll = torch.zeros(self.n - 1, dtype=torch.float64) if c is not None else None
        scored = False
        seconds_none = 0.0
        pending = False
        hooked = c is not None and not c.acts_in_forward
        if hooked:
            c.attach(model, self)
        try:
            for begin, end, first in self.windows():
                t0 = time.perf_counter()
                logits = model(input_ids=self.ids[begin:end].view(1, -1), use_cache=False).logits[0].float()
                seconds_none += time.perf_counter() - t0
                sc = logits[first - begin:end - 1 - begin]
                lp = torch.log_softmax(sc, -1)
                tg = self.ids[first + 1:end]
                self.nll_none[first:end - 1] = -lp.gather(1, tg.view(-1, 1)).squeeze(1).double().cpu()
                if c is None:
                    continue
                local: list[int] = []
                if sched is not None:
                    local, pending = self._fires(first, end, lp.exp().cpu() if sched.needs_probs else None, pending)
                self.fires.extend(local)
                out = c.score_window(self, Window(begin, end, first, sc, tg, self.nll_none[first:end - 1], local))
                if out is not None:
                    nll[first:end - 1] = out
                    scored = True
        finally:
            if hooked:
                c.detach()
        if c is not None:
            out = c.score_after(self)
            if out is not None:
                nll[:] = out
                scored = True
            if not scored:
                raise EngineError(f"control {type(c).__name__} does not say how to score a fixed text: implement "
                                  "score_window(scorer, win) or score_after(scorer) (see rcd.control.base)")
            if c.retrieves_itself:
                self.cost["retrievals"] += len(self.fires)
        cost = self.cost
        cost["steps"] = self.n - 1
        cost["wall_s"] = time.perf_counter() - t_wall
        cost["tokens"] = self.n - 1
        self.extra["cost"] = e.finish_cost(cost)
        self.extra["fire_positions"] = self.fires[:10000]
        n_bytes = len(e.tok.decode(self.ids_cpu[1:].tolist()).encode("utf-8"))
        return PerplexityResult(nll_none=self.nll_none.numpy().astype(np.float64),
                                nll=None if nll is None else nll.numpy().astype(np.float64), n_bytes=n_bytes,
                                seconds_none=seconds_none, seconds=cost["wall_s"] if c is not None else seconds_none,
                                fired=len(self.fires), extra=self.extra if c is not None else {})
