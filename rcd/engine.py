"""The decoding engine: one loop that owns the KV cache and serves generation, QA and scoring.

A strategy = what (datastore) × how (control) × when (schedule). The engine runs it:

    prefill → per step t: logits → fire = schedule.should_fire(t, p_t, x_{t-1}) (per row)
            → for firing rows: query → datastore.search → the control acts → choose x_t

How each control acts ("kind", see :func:`control_kind`):

=================  ==========================================================================
``context``        passages go into the prompt (:class:`rcd.control.context.PromptTemplate`);
                   the batch is re-prefilled with template(passages, prompt) + tokens so far
``replug``         one *view* per retrieved document (document d + prompt + tokens so far);
                   every step runs all views and mixes p = Σ_d softmax(s/τ)_d · p_d
``tags``/``span``  logits processors whose evidence (tags / passage token ids) the engine sets
                   when the schedule fires; they act on every later step of that row
``logits``         a self-retrieving processor (kNN-LM): apply(scores, hidden, fire)
``latent_kv``      precomputed chunk KV caches become the cache prefix (re-prefill after them)
``knn_attention``  forward hooks attend to retrieved memories in chosen layers (per-row gate)
``verify``         at each sentence end: retrieve evidence, score support, reject → roll the
                   sentence back and regenerate it (decision logged)
=================  ==========================================================================

Batching and the cache
----------------------
Rows are left-padded; position ids are explicit (``cumsum(mask) - 1`` plus the prefix length),
so rows of different lengths share one :class:`transformers.DynamicCache`. A row whose prompt
changes (context / REPLUG / injection fired, or verify rolled a sentence back) is re-prefilled
from token ids (its new prompt + the token ids it generated; the generated text is never
re-tokenized, so this reproduces a fresh forward pass). When every row changes, the batch is
prefilled afresh; when only some do, the others take their pending token as a normal step, the
changed rows are prefilled on their own, and their cache rows are spliced into the batch cache
(both sides left-padded to the longer length; a cache with sliding-window layers falls back to
re-prefilling the whole batch).

Schedules that do not read probabilities (once, every_n, sentence, every_token) are asked
*before* the forward pass of their step, so a firing step costs one prefill, not a step plus a
prefill. ``adaptive`` reads p_t, so the step is computed first; when it fires the prompt is rebuilt
(context / inject) or the last position recomputed with the memories on (knn_attention).

Cost and provenance
-------------------
Every run returns a cost dict: ``retrievals`` (row retrievals), ``retrieval_s``, ``model_s``,
``tokens`` (generated, eos included), ``ttft`` (seconds to the first token of the batch),
``tokens_per_s`` (tokens / wall seconds, retrieval included), ``steps`` (row-steps asked) and
``retrieval_rate`` = retrievals / steps. Each retrieval appends a provenance record
``{task, id, row, step, query, ids, doc_ids, scores, control}``; verify adds its decisions.

Scoring (perplexity)
--------------------
:meth:`Engine.score` computes the NLL of a text under the strategy. Schedule steps are global
positions of the text (position t predicts x_{t+1}; step t's last token is x_t). At every firing
position the query is the last ``query_tokens`` tokens up to x_t, and the retrieved evidence
holds until the next firing position (In-Context RALM with stride s for ``every_n``). Context and
REPLUG prepend the passages to the scored text, filling the window: each forward pass scores at
most ``stride`` positions and sees ``window - len(passages)`` tokens. Adaptive decides on the
plain model's p_t (the scored text is fixed, so there is no "generated with retrieval" p_t).
A query needs ``min_query_tokens`` tokens: a firing position before ``min_query_tokens - 1``
(e.g. step 0 of ``once``, whose query would be x_0 alone) is moved to that position; positions
without evidence (before the first retrieval, or when a search finds nothing) keep the plain NLL.
"""
from __future__ import annotations

import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from rcd.control.context import ContextControl, Passage, PromptTemplate
from rcd.errors import RcdError

QUERY_MODES = ("auto", "prompt", "last_sentence", "last_tokens", "prompt+generated")

#: kinds whose evidence changes the prompt or the cache prefix (re-prefill when they fire)
REBUILD_KINDS = ("context", "replug", "latent_kv")

#: what to do with a prompt that does not fit the context (``task.long_prompt``)
LONG_PROMPT = ("drop_passages", "truncate_left", "refuse")


class EngineError(RcdError):
    pass


def control_kind(control) -> str:
    """How a control acts in the engine (see the module table)."""
    if control is None:
        return "none"
    kind = getattr(control, "kind", None)
    if kind:
        return str(kind)
    from rcd.control.replug import ReplugEnsemble
    from rcd.control.span_filter import SpanFilter
    from rcd.control.tag_bias import TagBias

    if isinstance(control, ReplugEnsemble):
        return "replug"
    if isinstance(control, TagBias):
        return "tags"
    if isinstance(control, SpanFilter):
        return "span"
    return "logits"


@dataclass
class Request:
    """One prompt. ``prompt``: the user message (chat) or raw text; ``query``: what step-0
    retrieval searches with (default: the prompt)."""

    prompt: str
    query: Optional[str] = None
    id: Optional[str] = None


@dataclass
class Output:
    texts: list[str]
    token_ids: list[list[int]]
    cost: dict[str, Any]
    provenance: list[dict]
    retrieved: list[list[str]]  # per row: doc ids of every passage retrieved (in order, repeats kept)
    fired: list[int]  # per row: retrievals


def passages_from_hits(hits, row: int) -> list[Passage]:
    """ChunkHits row -> passages (entries with id < 0 are "no hit" and dropped)."""
    ids = hits.ids[row].tolist()
    scores = hits.scores[row].tolist()
    out = []
    for j, i in enumerate(ids):
        if i < 0:
            continue
        out.append(Passage(text=hits.texts[row][j], doc_id=str(hits.doc_ids[row][j]), score=float(scores[j]),
                           rank=len(out) + 1, id=int(i)))
    return out


def _last_sentence(text: str) -> str:
    parts = [p for p in re.split(r"(?<=[.!?\n])\s+", text.strip()) if p.strip()]
    return parts[-1] if parts else ""


class Engine:
    """Runs a strategy (datastore × control × schedule) over batches of prompts or a text.

    Parameters: ``template`` (how prompts and passages look; the control may override fields),
    ``k`` passages per retrieval, ``query`` mode (``auto``: the prompt at step 0, then the prompt
    plus the last ``query_tokens`` generated tokens; ``prompt``; ``last_sentence``; ``last_tokens``
    of prompt + generation; ``prompt+generated``), ``max_new_tokens``, greedy unless
    ``do_sample``, ``batch_size`` rows per decoding batch, ``tag_format`` (how a retrieved tag is
    written before tokenization), ``provenance`` (a list the records are appended to), ``trace``
    (a list that receives every step's log-probabilities, for tests and debugging).
    """

    def __init__(self, lm, strategy=None, *, template: Optional[PromptTemplate] = None, k: int = 3,
                 query: str = "auto", query_tokens: int = 32, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 8, tag_format: str = " {tag}",
                 provenance: Optional[list] = None, task: str = "generate", stop_at_eos: bool = True,
                 trace: Optional[list] = None, min_query_tokens: int = 16, long_prompt: str = "drop_passages") -> None:
        if query not in QUERY_MODES:
            raise EngineError(f"retrieval query mode {query!r} is not one of {QUERY_MODES}")
        if int(k) < 1 or int(query_tokens) < 1 or int(max_new_tokens) < 1 or int(batch_size) < 1:
            raise EngineError(f"k={k}, query_tokens={query_tokens}, max_new_tokens={max_new_tokens} and "
                              f"batch_size={batch_size} must all be >= 1")
        self.lm = lm
        self.model, self.tok = lm.model, lm.tokenizer
        self.control = getattr(strategy, "control", None)
        self.schedule = getattr(strategy, "schedule", None)
        self.datastore = getattr(strategy, "datastore", None)
        self.name = getattr(strategy, "name", "none")
        self.kind = control_kind(self.control)
        if self.kind != "none" and self.datastore is None:
            raise EngineError(f"strategy {self.name!r}: control {type(self.control).__name__} needs a datastore")
        if self.schedule is None and self.kind != "none":
            from rcd.schedule import EveryToken, Once

            self.schedule = EveryToken() if self.kind in ("logits", "knn_attention") else Once()
        if self.schedule is not None and getattr(self.schedule, "needs_tokenizer", False) \
                and getattr(self.schedule, "ends_sentence", 1) is None:
            self.schedule.bind(self.tok)
        base = template or PromptTemplate()
        self.template = self.control.template(base) if isinstance(self.control, ContextControl) else base
        self.k, self.query_mode, self.query_tokens = int(k), query, int(query_tokens)
        self.min_query_tokens = max(1, min(int(min_query_tokens), self.query_tokens))
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.do_sample, self.temperature, self.seed = bool(do_sample), float(temperature), int(seed)
        self.tag_format = tag_format
        self.provenance = provenance if provenance is not None else []
        self.task = task
        self.stop_at_eos = bool(stop_at_eos)
        self.trace = trace  # when a list: one record per step {step, logprobs [B, V], fire [B], gen}
        eos = self.tok.eos_token_id
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos_ids = {int(e) for e in ([eos] if isinstance(eos, int) else (eos or []))}
        eos_ids |= {int(e) for e in ([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))}
        if not eos_ids:
            raise EngineError(f"tokenizer {type(self.tok).__name__} has no eos token")
        self.eos_ids = eos_ids
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else min(eos_ids))
        self._prompt_cache: dict[str, list[int]] = {}
        if long_prompt not in LONG_PROMPT:
            raise EngineError(f"task.long_prompt={long_prompt!r} is not one of {LONG_PROMPT}")
        self.long_prompt = long_prompt
        ctx = lm.context_length
        #: most prompt tokens a row may have: its generation must fit the context too (an injected KV
        #: prefix is bounded on its own, by the control's ``max_prefix_tokens``)
        self.prompt_limit = None if ctx is None else ctx - self.max_new_tokens
        if self.prompt_limit is not None and self.prompt_limit < 1:
            raise EngineError(f"max_new_tokens={self.max_new_tokens} leaves no room for a prompt in the model's "
                              f"context of {ctx} positions")
        self._fitted: dict[tuple, tuple[int, bool]] = {}  # (prompt, passages) -> (passages dropped, truncated)
        self._capture = None
        self._setup_control()

    # ------------------------------------------------------------------ set-up
    def _setup_control(self) -> None:
        c = self.control
        if self.kind == "span":
            if c.eos == [-1]:
                c.eos = sorted(self.eos_ids)
        if self.kind == "logits" and hasattr(c, "bind"):
            from rcd.hooks import HiddenCapture

            layer = "final"
            manifest = getattr(self.datastore, "manifest", None) or {}
            if manifest.get("layer") not in (None, "final", "lm_head"):
                layer = int(manifest["layer"])
            self._capture = HiddenCapture(self.model, layer)
            c.bind(datastore=self.datastore, capture=self._capture)
        if self.kind in ("latent_kv", "knn_attention", "verify") and hasattr(c, "bind"):
            c.bind(datastore=self.datastore)
        if self.kind in ("latent_kv", "knn_attention"):
            c.check(self.model)  # fails at start-up when the model cannot take the injection

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def new_cost(self) -> dict[str, Any]:
        return {"retrievals": 0, "retrieval_s": 0.0, "model_s": 0.0, "tokens": 0, "ttft": None, "steps": 0,
                "wall_s": 0.0}

    @staticmethod
    def finish_cost(cost: dict) -> dict:
        cost["tokens_per_s"] = cost["tokens"] / cost["wall_s"] if cost["wall_s"] > 0 else 0.0
        cost["retrieval_rate"] = cost["retrievals"] / cost["steps"] if cost["steps"] else 0.0
        return cost

    # ------------------------------------------------------------------ text helpers
    def encode(self, text: str) -> list[int]:
        ids = self._prompt_cache.get(text)
        if ids is None:
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            if len(self._prompt_cache) > 4096:
                self._prompt_cache.clear()
            self._prompt_cache[text] = ids
        return ids

    def prompt_ids(self, prompt: str, passages: Sequence[Passage] = (), template: Optional[PromptTemplate] = None
                   ) -> list[int]:
        """Token ids of ``prompt`` with ``passages`` under the template, fitted to the context by the
        ``long_prompt`` policy: ``drop_passages`` drops the lowest-ranked passages until the prompt fits
        and then keeps its last tokens; ``truncate_left`` keeps the last tokens; ``refuse`` raises.
        Every prompt that had to be fitted is counted once (:meth:`fit_counts`)."""
        if isinstance(self.control, ContextControl):
            passages = self.control.select(passages)
        tpl = template or self.template
        ids = self.encode(tpl.render(self.tok, prompt, passages))
        if not ids:
            raise EngineError("a prompt rendered to zero tokens; give a non-empty prompt")
        limit = self.prompt_limit
        if limit is None or len(ids) <= limit:
            return ids
        if self.long_prompt == "refuse":
            raise EngineError(f"a prompt of {len(ids)} tokens (with {len(passages)} passages) and "
                              f"{self.max_new_tokens} new tokens exceed the model's context; shorten it, or set "
                              "task.long_prompt=drop_passages|truncate_left")
        key = (prompt, tuple(p.text for p in passages))
        kept = list(passages)
        if self.long_prompt == "drop_passages":
            while kept and len(ids) > limit:
                kept.pop()
                ids = self.encode(tpl.render(self.tok, prompt, kept))
        truncated = len(ids) > limit
        if truncated:
            ids = ids[-limit:]
        self._fitted[key] = (len(passages) - len(kept), truncated)
        return ids

    def fit_counts(self) -> dict[str, int]:
        """Prompts fitted to the context since the last :meth:`generate`: how many, passages dropped, truncated."""
        return {"prompts_fitted": len(self._fitted), "passages_dropped": sum(d for d, _ in self._fitted.values()),
                "prompts_truncated": sum(1 for _, t in self._fitted.values() if t)}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def build_query(self, req: Request, gen: Sequence[int], step: int, sentence: Optional[Sequence[int]] = None) -> str:
        base = req.query if req.query is not None else req.prompt
        mode = self.query_mode
        if mode == "auto":
            mode = "prompt" if step == 0 and sentence is None else "prompt+generated"
        if mode == "prompt":
            return base
        tail = self.decode(list(sentence) if sentence is not None else list(gen)[-self.query_tokens:])
        if mode == "prompt+generated":
            return f"{base} {tail}".strip()
        if mode == "last_sentence":
            s = _last_sentence(self.decode(sentence if sentence is not None else gen))
            return s or base
        # last_tokens of prompt text + generation
        ids = self.encode(req.prompt) + list(gen)
        return self.decode(ids[-self.query_tokens:])

    # ------------------------------------------------------------------ retrieval
    def search(self, queries: list[str], cost: dict):
        t0 = time.perf_counter()
        if self.kind == "knn_attention":
            raise EngineError("knn_attention retrieves inside its hooks, not by text query")
        hits = self.datastore.search(list(queries), self.k)
        cost["retrieval_s"] += time.perf_counter() - t0
        cost["retrievals"] += len(queries)
        return hits

    def log_hits(self, hits, rows: Sequence[int], queries: Sequence[str], step, reqs: Sequence[Request],
                 positions: Optional[Sequence[int]] = None) -> None:
        for j, (r, q) in enumerate(zip(rows, queries)):
            rec = {"task": self.task, "strategy": self.name, "control": self.kind,
                   "phase": "generate" if positions is None else "score",
                   "id": reqs[r].id if reqs else None, "row": int(r),
                   "step": int(step if positions is None else positions[j]), "query": q}
            if hasattr(hits, "tags"):
                rec.update({"tags": list(hits.tags[j]), "weights": [float(w) for w in hits.weights[j]]})
            else:
                ids = hits.ids[j].tolist()
                rec.update({"ids": ids, "doc_ids": list(hits.doc_ids[j]),
                            "scores": [float(s) if math.isfinite(s) else None for s in hits.scores[j].tolist()]})
            self.provenance.append(rec)

    def tag_evidence(self, hits, row: int) -> tuple[list[list[int]], list[float]]:
        """(token ids, weight) of the retrieved tags of one row, for ``TagBias.set_evidence``.

        A hits object with ``bias_evidence(tokenizer)`` (rcd.datastore.tags.TagHits: both the
        plain and the space-prefixed spelling of each tag) decides; otherwise each tag is written
        as ``tag_format`` and tokenized.
        """
        if hasattr(hits, "bias_evidence"):
            if getattr(hits, "_rcd_bias", None) is None:
                hits._rcd_bias = hits.bias_evidence(self.tok)
            ids, weights = hits._rcd_bias
            return [list(t) for t in ids[row]], [float(w) for w in weights[row]]
        return ([self.encode(self.tag_format.format(tag=t)) for t in hits.tags[row]],
                [float(w) for w in hits.weights[row]])

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids, mask, pos, cache, cost, keep: int = 1):
        t0 = time.perf_counter()
        kwargs = {"logits_to_keep": keep} if keep else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                         **kwargs)
        cost["model_s"] += time.perf_counter() - t0
        return out

    def prefill(self, seqs: list[list[int]], cost: dict, prefix=None) -> "_CacheState":
        """Left-padded prefill of ``seqs`` (after an optional injected KV ``prefix``)."""
        out, full, pos = self.forward_padded(seqs, cost, prefix=prefix, keep=1)
        return _CacheState(cache=out.past_key_values, mask=full, next_pos=pos[:, -1] + 1,
                           logits=out.logits[:, -1].float())

    def forward_padded(self, seqs: list[list[int]], cost: dict, prefix=None, keep: int = 1):
        """One forward over left-padded ``seqs``; logits of the last ``keep`` positions of every row."""
        from transformers import DynamicCache

        R, T = len(seqs), max(len(s) for s in seqs)
        dev = self.device
        ids = torch.full((R, T), self.pad_id, dtype=torch.long)
        m = torch.zeros((R, T), dtype=torch.long)
        for r, s in enumerate(seqs):
            if len(s) == 0:
                raise EngineError("cannot prefill an empty sequence")
            ids[r, T - len(s):] = torch.tensor(s, dtype=torch.long)
            m[r, T - len(s):] = 1
        ids, m = ids.to(dev), m.to(dev)
        pos = (m.cumsum(1) - 1).clamp_min(0)
        if prefix is not None:
            cache = DynamicCache(ddp_cache_data=list(zip(prefix.keys, prefix.values)), config=self.model.config)
            pos = pos + prefix.next_pos.to(dev).view(-1, 1)
            full = torch.cat([prefix.mask.to(dev), m], 1)
        else:
            cache = DynamicCache(config=self.model.config)
            full = m
        out = self._forward(ids, full, pos, cache, cost, keep=keep)
        return out, full, pos

    def step(self, state: "_CacheState", tokens: torch.Tensor, cost: dict) -> "_CacheState":
        R = tokens.shape[0]
        mask = torch.cat([state.mask, torch.ones((R, 1), dtype=state.mask.dtype, device=state.mask.device)], 1)
        pos = state.next_pos.view(R, 1)
        out = self._forward(tokens.view(R, 1).to(self.device), mask, pos, state.cache, cost)
        return _CacheState(cache=out.past_key_values, mask=mask, next_pos=state.next_pos + 1,
                           logits=out.logits[:, -1].float(), last=tokens.view(R).to(self.device))

    def redo_last(self, state: "_CacheState", cost: dict) -> "_CacheState":
        """Drop the last cached position and recompute it (hooks may have changed)."""
        state.cache.crop(-1)
        prev = _CacheState(cache=state.cache, mask=state.mask[:, :-1], next_pos=state.next_pos - 1, logits=None)
        return self.step(prev, state.last, cost)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request | str], max_new_tokens: Optional[int] = None) -> Output:
        """Decode every request (in batches of ``batch_size``); texts exclude the prompt and eos."""
        reqs = [r if isinstance(r, Request) else Request(prompt=str(r)) for r in requests]
        self._fitted.clear()
        outs = [self._generate_batch(reqs[i:i + self.batch_size], max_new_tokens or self.max_new_tokens, i)
                for i in range(0, len(reqs), self.batch_size)]
        cost = self.new_cost()
        for o in outs:
            for key in ("retrievals", "retrieval_s", "model_s", "tokens", "steps", "wall_s"):
                cost[key] += o.cost[key]
        ttfts = [o.cost["ttft"] for o in outs if o.cost["ttft"] is not None]
        cost["ttft"] = sum(ttfts) / len(ttfts) if ttfts else None
        cost["batches"] = len(outs)
        cost.update(self.fit_counts())
        return Output(texts=[t for o in outs for t in o.texts], token_ids=[t for o in outs for t in o.token_ids],
                      cost=self.finish_cost(cost), provenance=[p for o in outs for p in o.provenance],
                      retrieved=[t for o in outs for t in o.retrieved], fired=[f for o in outs for f in o.fired])

    def _generate_batch(self, reqs: list[Request], max_new: int, offset: int) -> Output:
        run = _Run(self, reqs, max_new)
        n_prov = len(self.provenance)
        if self._capture is not None:
            self._capture.attach()
        if self.kind == "knn_attention":
            self.control.attach(self.model, on_retrieval=run.on_memory_retrieval)
        try:
            run.loop()
        finally:
            if self._capture is not None:
                self._capture.detach()
            if self.kind == "knn_attention":
                self.control.detach()
        for rec in self.provenance[n_prov:]:
            if "row" in rec:
                rec["row"] += offset
        texts = [self.decode([t for t in g if t not in self.eos_ids]) for g in run.gen]
        return Output(texts=texts, token_ids=[list(g) for g in run.gen], cost=run.cost,
                      provenance=self.provenance[n_prov:], retrieved=run.retrieved, fired=run.fired)

    # ------------------------------------------------------------------ model.generate adapter
    def processor(self) -> "EngineProcessor":
        return EngineProcessor(self)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor, *, window: int = 512, stride: int = 256):
        """Per-token NLL of ``token_ids`` plain and under the strategy -> ``PerplexityResult``."""
        return score_text(self, token_ids, window=window, stride=stride)


@dataclass
class _CacheState:
    cache: Any
    mask: torch.Tensor  # [R, L] long
    next_pos: torch.Tensor  # [R] long
    logits: Optional[torch.Tensor]  # [R, V] float (last position)
    last: Optional[torch.Tensor] = None  # [R] token fed by the last step


class _Run:
    """State of one decoding batch: per-row tokens, evidence, cache; the loop itself."""

    def __init__(self, engine: Engine, reqs: list[Request], max_new: int,
                 template: Optional[PromptTemplate] = None) -> None:
        self.e = engine
        self.template = template or engine.template
        self.reqs = reqs
        self.B = len(reqs)
        self.max_new = max_new
        self.kind = engine.kind
        self.V = engine.k if self.kind == "replug" else 1
        self.gen: list[list[int]] = [[] for _ in reqs]
        self.done = [False] * self.B
        self.passages: list[list[Passage]] = [[] for _ in reqs]  # context / replug / span / verify evidence
        self.in_context: list[bool] = [False] * self.B  # verify(regenerate=evidence): passages in the prompt
        self.latent_ids: list[list[int]] = [[] for _ in reqs]
        self.tags: list[list[tuple[list[int], float]]] = [[] for _ in reqs]
        self.has_evidence = torch.zeros(self.B, dtype=torch.bool)
        self.sent_start = [0] * self.B
        self.retries = [0] * self.B
        self.skip_fire = [False] * self.B
        self.retrieved: list[list[str]] = [[] for _ in reqs]
        self.fired = [0] * self.B
        self.cost = engine.new_cost()
        self.state: Optional[_CacheState] = None
        self.pending: Optional[torch.Tensor] = None  # token chosen, not yet fed
        self.step_no = 0
        self.gen_seed = torch.Generator(device="cpu").manual_seed(engine.seed)
        self.mem_active: Optional[torch.Tensor] = None
        self.no_rollback = False
        self.dirty: set[int] = set()  # rows whose prompt changed: re-prefilled at the next ensure_logits

    # ---------------------------------------------------------------- prompts
    def seqs(self, rows: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Token ids each view reads: its prompt (with the row's evidence) + the row's generated tokens."""
        e = self.e
        out = []
        for b in (range(self.B) if rows is None else rows):
            req = self.reqs[b]
            if self.kind == "replug":
                ps = self.passages[b]
                for v in range(self.V):
                    out.append(e.prompt_ids(req.prompt, [ps[v]] if v < len(ps) else [], self.template) + self.gen[b])
            elif self.kind == "context" or (self.kind == "verify" and self.in_context[b]):
                out.append(e.prompt_ids(req.prompt, self.passages[b], self.template) + self.gen[b])
            else:
                out.append(e.prompt_ids(req.prompt, (), self.template) + self.gen[b])
        return out

    def doc_scores(self) -> torch.Tensor:
        s = torch.zeros(self.B, self.V)
        for b in range(self.B):
            ps = self.passages[b]
            if ps:
                s[b] = float("-inf")
                for v in range(min(self.V, len(ps))):
                    s[b, v] = ps[v].score
        return s

    def prefill_rows(self, rows: Sequence[int]) -> "_CacheState":
        prefix = None
        if self.kind == "latent_kv" and any(self.latent_ids[b] for b in rows):
            prefix = self.e.control.prefix(self.e.lm, [self.latent_ids[b] for b in rows], self.cost)
        return self.e.prefill(self.seqs(rows), self.cost, prefix=prefix)

    def rebuild(self) -> None:
        if self.kind == "knn_attention":
            self.e.control.active = self.mem_active
        self.state = self.prefill_rows(range(self.B))
        self.pending = None
        self.dirty.clear()

    def ensure_logits(self) -> None:
        """Bring the cache up to date: full prefill, or feed the pending token and re-prefill dirty rows."""
        if self.state is None or len(self.dirty) == self.B:
            self.rebuild()
            return
        if self.pending is not None:
            if self.kind == "knn_attention":
                self.e.control.active = self.mem_active
            tokens = self.pending.repeat_interleave(self.V)
            self.state = self.e.step(self.state, tokens, self.cost)
            self.pending = None
        if self.dirty:
            rows = sorted(self.dirty)
            self.dirty.clear()
            views = [b * self.V + v for b in rows for v in range(self.V)]
            merged = _splice(self.state, self.prefill_rows(rows), views)
            if merged is None:  # a cache layout that cannot be spliced: re-prefill everything
                self.rebuild()
            else:
                self.state = merged

    # ---------------------------------------------------------------- retrieval
    def last_tokens(self) -> Optional[torch.Tensor]:
        if self.step_no == 0:
            return None
        return torch.tensor([g[-1] if g else self.e.pad_id for g in self.gen], dtype=torch.long)

    def retrieve(self, rows: list[int], sentences: Optional[dict] = None):
        e = self.e
        queries = [e.build_query(self.reqs[b], self.gen[b], self.step_no,
                                 sentence=None if sentences is None else sentences.get(b)) for b in rows]
        hits = e.search(queries, self.cost)
        e.log_hits(hits, rows, queries, self.step_no, self.reqs)
        for j, b in enumerate(rows):
            self.fired[b] += 1
            if hasattr(hits, "tags"):
                self.retrieved[b].extend(list(hits.tags[j]))
            else:
                self.retrieved[b].extend(str(d) for d, i in zip(hits.doc_ids[j], hits.ids[j].tolist()) if i >= 0)
        return hits

    def on_memory_retrieval(self, mask: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor,
                            seconds: float) -> None:
        """Called by the kNN-attention hook once per forward: provenance of each row's last position."""
        self.cost["retrieval_s"] += seconds
        T = mask.shape[1]
        for n, (r, t) in enumerate(mask.nonzero().tolist()):
            if t == T - 1 and r % self.V == 0:
                b = r // self.V
                self.e.provenance.append({
                    "task": self.e.task, "strategy": self.e.name, "control": self.kind, "id": self.reqs[b].id,
                    "row": b, "step": self.step_no, "memory_ids": ids[n, :8].tolist(),
                    "scores": [float(x) if math.isfinite(x) else None for x in scores[n, :8].tolist()]})

    def act(self, fire: torch.Tensor) -> None:
        """Retrieve for the firing rows and let the control take the evidence."""
        rows = [b for b in range(self.B) if bool(fire[b])]
        e, c = self.e, self.e.control
        if self.kind in ("knn_attention", "logits"):  # these retrieve inside their hook / apply
            for b in rows:
                self.fired[b] += 1
            self.cost["retrievals"] += len(rows)
            return
        if self.kind == "verify" and self.step_no > 0:
            self.verify_rows(rows, at_eos=False)
            return
        hits = self.retrieve(rows)
        for j, b in enumerate(rows):
            if self.kind == "tags":
                self.tags[b] = list(zip(*e.tag_evidence(hits, j)))
            elif self.kind == "latent_kv":
                self.latent_ids[b] = [i for i in hits.ids[j].tolist() if i >= 0]
                self.passages[b] = passages_from_hits(hits, j)
            else:
                self.passages[b] = passages_from_hits(hits, j)
            self.has_evidence[b] = True
        if self.kind == "tags":
            c.set_evidence([[t for t, _ in row] for row in self.tags], [[w for _, w in row] for row in self.tags],
                           start=self.step_no)
        elif self.kind == "span":
            c.set_evidence([[e.encode(p.text) for p in ps] if self.has_evidence[b] else None
                            for b, ps in enumerate(self.passages)], start=0)

    # ---------------------------------------------------------------- verify
    def verify_rows(self, rows: list[int], at_eos: bool) -> bool:
        """Check the sentence each row just finished; roll back rejected ones. True if any was rejected."""
        c = self.e.control
        sentences = {}
        for b in rows:
            end = len(self.gen[b])
            if at_eos and end and self.gen[b][-1] in self.e.eos_ids:
                end -= 1
            sent = self.gen[b][self.sent_start[b]:end]
            if self.decode_words(sent):
                sentences[b] = sent
        rows = [b for b in rows if b in sentences]
        if not rows:
            return False
        hits = self.retrieve(rows, sentences)
        rejected = False
        for j, b in enumerate(rows):
            self.passages[b] = _merge(self.passages[b], passages_from_hits(hits, j))
            text = self.e.decode(sentences[b])
            decision, support = c.judge(text, [p.text for p in self.passages[b]], self.retries[b],
                                        given=self.reqs[b].query or self.reqs[b].prompt)
            if decision == "reject" and self.no_rollback:
                decision = "reject_kept"  # inside model.generate an emitted sentence cannot be taken back
            self.e.provenance.append({"task": self.e.task, "strategy": self.e.name, "control": "verify",
                                      "event": "verify", "id": self.reqs[b].id, "row": b, "step": self.step_no,
                                      "sentence": text, "support": support, "decision": decision,
                                      "retry": self.retries[b],
                                      "evidence": [p.doc_id for p in self.passages[b]]})
            if decision == "reject":
                rejected = True
                start = self.sent_start[b]
                c.ban(b, start, sentences[b])
                self.gen[b] = self.gen[b][:start]
                self.retries[b] += 1
                self.done[b] = False
                self.skip_fire[b] = True
                if c.regenerate == "evidence":
                    self.in_context[b] = True
                self.dirty.add(b)  # re-prefill the rolled-back row (with the evidence in context)
            else:
                self.sent_start[b] = len(self.gen[b]) - (1 if at_eos else 0)
                self.retries[b] = 0
                c.clear(b)
        return rejected

    def decode_words(self, ids: Sequence[int]) -> bool:
        return bool(re.search(r"\w", self.e.decode([t for t in ids if t not in self.e.eos_ids])))

    # ---------------------------------------------------------------- control on logits
    def logprobs(self, fire: torch.Tensor) -> torch.Tensor:
        e, c = self.e, self.e.control
        logits = self.state.logits  # [R, V]
        if self.kind == "replug":
            doc = logits.view(self.B, self.V, -1)
            return c.apply(doc[:, 0], doc_logprobs=doc, doc_scores=self.doc_scores().to(doc.device))
        if self.kind in ("tags", "span"):
            if not bool(self.has_evidence.any()):
                return torch.log_softmax(logits, -1)
            width = max(len(g) for g in self.gen)
            ids = torch.full((self.B, max(width, 1)), e.pad_id, dtype=torch.long)
            for b, g in enumerate(self.gen):
                if g:
                    ids[b, ids.shape[1] - len(g):] = torch.tensor(g)
            ids = ids[:, :width]
            return c.apply(logits, input_ids=ids, fire=self.has_evidence.to(logits.device))
        if self.kind == "verify":
            return c.apply(logits, gen=self.gen)
        if self.kind == "logits":
            t0 = time.perf_counter()
            out = c.apply(logits, input_ids=None, hidden=c.current_hidden(), fire=fire.to(logits.device))
            self.cost["retrieval_s"] += time.perf_counter() - t0
            nb = getattr(c, "last_neighbours", None)
            if nb is not None and bool(fire.any()):
                rows = [b for b in range(self.B) if bool(fire[b])]
                for j, b in enumerate(rows[: nb.ids.shape[0]]):
                    e.provenance.append({"task": e.task, "strategy": e.name, "control": self.kind,
                                         "id": self.reqs[b].id, "row": b, "step": self.step_no,
                                         "ids": nb.ids[j, :8].tolist(), "scores": nb.scores[j, :8].tolist(),
                                         "tokens": nb.tokens[j, :8].tolist()})
                c.last_neighbours = None
            return out
        return torch.log_softmax(logits, -1)

    def choose(self, lp: torch.Tensor) -> torch.Tensor:
        if self.e.do_sample:
            probs = torch.softmax(lp.float().cpu() / self.e.temperature, -1)
            return torch.multinomial(probs, 1, generator=self.gen_seed).view(-1)
        return lp.argmax(-1).cpu()

    # ---------------------------------------------------------------- the loop
    def decide_and_act(self) -> torch.Tensor:
        """Ask the schedule for step ``step_no`` and let the control act on the firing rows."""
        e, sched = self.e, self.e.schedule
        active = torch.tensor([not d for d in self.done])
        self.cost["steps"] += int(active.sum())
        fire = torch.zeros(self.B, dtype=torch.bool)
        if sched is not None:
            if sched.needs_probs:
                if self.kind == "knn_attention":
                    self.mem_active = torch.zeros(self.B * self.V, dtype=torch.bool)
                self.ensure_logits()
                lp0 = torch.log_softmax(self.state.logits.view(self.B, self.V, -1)[:, 0], -1)
                fire = sched.should_fire(self.step_no, lp0.exp().cpu(), self.last_tokens()).cpu()
            else:
                fire = sched.should_fire(self.step_no, None, self.last_tokens()).cpu()
            fire = fire & active & ~torch.tensor(self.skip_fire, dtype=torch.bool)
        self.skip_fire = [False] * self.B
        if bool(fire.any()):
            self.act(fire)
            if self.kind in REBUILD_KINDS:
                self.dirty.update(b for b in range(self.B) if bool(fire[b]))
            elif self.kind == "knn_attention":
                self.mem_active = fire.repeat_interleave(self.V)
                if self.state is not None and self.pending is None:  # adaptive: logits computed without memories
                    e.control.active = self.mem_active
                    self.state = e.redo_last(self.state, self.cost) if self.step_no > 0 else None
        elif self.kind == "knn_attention":
            self.mem_active = torch.zeros(self.B * self.V, dtype=torch.bool)
        return fire

    def loop(self) -> None:
        e, sched = self.e, self.e.schedule
        t_start = time.perf_counter()
        if sched is not None:
            sched.reset(self.B, device=torch.device("cpu"))
        budget = self.max_new * (1 + int(getattr(e.control, "max_retries", 0) or 0)) + 1
        while True:
            fire = self.decide_and_act()
            self.ensure_logits()
            lp = self.logprobs(fire)
            if e.trace is not None:
                e.trace.append({"step": self.step_no, "logprobs": lp.detach().float().cpu(), "fire": fire.clone(),
                                "gen": [list(g) for g in self.gen], "passages": [list(p) for p in self.passages]})
            nxt = self.choose(lp)
            if self.cost["ttft"] is None:
                self.cost["ttft"] = time.perf_counter() - t_start
            eos_rows = []
            for b in range(self.B):
                if self.done[b]:
                    nxt[b] = e.pad_id
                    continue
                tok = int(nxt[b])
                self.gen[b].append(tok)
                if e.stop_at_eos and tok in e.eos_ids:
                    self.done[b] = True
                    eos_rows.append(b)
                elif len(self.gen[b]) >= self.max_new:
                    self.done[b] = True
                    if self.kind == "verify":
                        eos_rows.append(b)
            if self.kind == "verify" and eos_rows:
                self.verify_rows(eos_rows, at_eos=True)
            self.step_no += 1
            if all(self.done) or self.step_no >= budget:
                break
            if self.state is not None:
                self.pending = nxt
        self.cost["tokens"] = sum(len(g) for g in self.gen)
        self.cost["wall_s"] = time.perf_counter() - t_start


def _splice(old: "_CacheState", sub: "_CacheState", rows: Sequence[int]) -> Optional["_CacheState"]:
    """``old`` with cache rows ``rows`` replaced by ``sub`` (both left-padded to the longer length).

    Returns None when a cache layer is not a plain growing layer (e.g. sliding window), which
    the caller answers with a full re-prefill.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers_old, layers_sub = old.cache.layers, sub.cache.layers
    if any(type(x) is not DynamicLayer or isinstance(x, DynamicSlidingWindowLayer) for x in layers_old + layers_sub):
        return None
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
    return _CacheState(cache=old.cache, mask=mask, next_pos=next_pos, logits=logits, last=old.last)


def _merge(old: list[Passage], new: list[Passage]) -> list[Passage]:
    seen = {p.doc_id or p.text for p in old}
    out = list(old)
    for p in new:
        key = p.doc_id or p.text
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


class EngineProcessor:
    """Runs the engine inside ``model.generate``: a LogitsProcessor that replaces the plain scores.

    ``model.generate`` keeps its own plain forward pass (so this costs one extra forward per
    step); the engine's own cache produces the strategy's log-probabilities, which ``generate``
    then picks from. The prompts are read back from ``input_ids`` (left padding dropped) and
    re-rendered without a chat wrapper (they already carry one if the caller used it). Verify
    cannot run here (``generate`` cannot take back an emitted sentence): use
    :meth:`Engine.generate`, the efficient path for every strategy.
    """

    def __init__(self, engine: Engine) -> None:
        if engine.kind == "verify":
            warnings.warn("verify inside model.generate checks and logs each sentence but cannot take back a "
                          "rejected one (logged as 'reject_kept'); rcd.engine.Engine.generate regenerates it",
                          RuntimeWarning, stacklevel=2)
        self.e = engine
        self.run: Optional[_Run] = None
        self.prompt_len = 0

    def bind(self, **_: Any) -> "EngineProcessor":
        return self

    def _start(self, input_ids: torch.Tensor) -> None:
        e = self.e
        self.prompt_len = input_ids.shape[1]
        prompts = []
        for row in input_ids.tolist():
            i = 0
            while i < len(row) - 1 and row[i] == e.pad_id:
                i += 1
            prompts.append(e.tok.decode(row[i:], skip_special_tokens=False))
        raw = e.template.updated({"chat": "never", "system": None})
        self.run = _Run(e, [Request(prompt=p) for p in prompts], max_new=10 ** 9, template=raw)
        self.run.no_rollback = True
        if e.schedule is not None:
            e.schedule.reset(len(prompts), device=torch.device("cpu"))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        e = self.e
        if self.run is None or input_ids.shape[1] <= self.prompt_len:
            self._start(input_ids)
        else:
            tok = input_ids[:, -1].cpu()
            for b in range(self.run.B):
                self.run.gen[b].append(int(tok[b]))
            self.run.step_no += 1
            if self.run.state is not None:
                self.run.pending = tok
        r = self.run
        if e._capture is not None:
            e._capture.attach()
        if e.kind == "knn_attention":
            e.control.attach(e.model, on_retrieval=r.on_memory_retrieval)
        try:
            fire = r.decide_and_act()
            r.ensure_logits()
            return r.logprobs(fire).to(scores.dtype)
        finally:
            if e._capture is not None:
                e._capture.detach()
            if e.kind == "knn_attention":
                e.control.detach()


def from_config(lm, strategy, cfg=None, *, task: str = "generate", provenance: Optional[list] = None,
                **overrides: Any) -> Engine:
    """An :class:`Engine` for ``strategy`` with ``strategy.retrieval`` and ``task.template`` of ``cfg``.

    ``strategy.retrieval`` (optional): ``k``, ``query``, ``query_tokens``, ``tag_format``;
    ``task.template`` (optional): :class:`PromptTemplate` fields. ``overrides`` win.
    """
    from omegaconf import OmegaConf

    def section(key):
        if cfg is None:
            return {}
        node = OmegaConf.select(cfg, key)
        return {} if node is None else OmegaConf.to_container(node, resolve=True)

    retrieval = dict(getattr(strategy, "retrieval", None) or section("strategy.retrieval"))
    known = {"k", "query", "query_tokens", "min_query_tokens", "tag_format"}
    unknown = sorted(set(retrieval) - known)
    if unknown:
        raise EngineError(f"strategy.retrieval has unknown key(s) {unknown}; known: {sorted(known)}")
    template = PromptTemplate.from_config(section("task.template"))
    kwargs: dict[str, Any] = {"template": template, **retrieval}
    long_prompt = OmegaConf.select(cfg, "task.long_prompt") if cfg is not None else None
    if long_prompt is not None:
        kwargs["long_prompt"] = long_prompt
    kwargs.update(overrides)
    return Engine(lm, strategy, task=task, provenance=provenance, **kwargs)


# ====================================================================== scoring
def _score_blocks(e: Engine, blocks: list[dict], cost: dict, batch: int = 4) -> list[torch.Tensor]:
    """log p(targets) for blocks ``{seq, targets, prefix}``: the targets follow the last positions of seq."""
    out: list[Optional[torch.Tensor]] = [None] * len(blocks)
    order = sorted(range(len(blocks)), key=lambda i: (str(blocks[i].get("prefix")), len(blocks[i]["seq"])))
    for s0 in range(0, len(order), batch):
        idx = order[s0:s0 + batch]
        prefix = None
        if any(blocks[i].get("prefix") for i in idx):
            prefix = e.control.prefix(e.lm, [blocks[i].get("prefix") or [] for i in idx], cost)
        keep = max(len(blocks[i]["targets"]) for i in idx)
        res, _, _ = e.forward_padded([blocks[i]["seq"] for i in idx], cost, prefix=prefix, keep=keep)
        lp_all = torch.log_softmax(res.logits.float(), -1)
        for j, i in enumerate(idx):
            tg = torch.tensor(blocks[i]["targets"], device=lp_all.device)
            lp = lp_all[j, keep - len(tg):]
            out[i] = lp.gather(1, tg.view(-1, 1)).squeeze(1).cpu()
    return out  # type: ignore[return-value]


def _blocks_for(ids: torch.Tensor, a: int, b: int, prefix: list[int], window: int, stride: int) -> list[dict]:
    """Blocks scoring positions [a, b) (position p predicts ids[p+1]) after ``prefix``."""
    budget = window - len(prefix)
    size = max(1, min(stride, budget))
    blocks = []
    for c0 in range(a, b, size):
        c1 = min(c0 + size, b)
        s0 = max(0, c1 - budget)
        blocks.append({"seq": list(prefix) + ids[s0:c1].tolist(), "targets": ids[c0 + 1:c1 + 1].tolist(),
                       "positions": (c0, c1)})
    return blocks


def score_text(e: Engine, token_ids: torch.Tensor, *, window: int = 512, stride: int = 256):
    """NLL of every token of ``token_ids`` plain and under the engine's strategy (module doc, "Scoring")."""
    import numpy as np

    from rcd.control.replug import replug_mix
    from rcd.tasks import perplexity as P

    ids = token_ids.to(e.device).view(-1)
    n = ids.numel()
    if n < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens: nothing to score")
    if e.kind in ("none", "logits"):
        return P.score(e.lm, ids, e.control, e.schedule, window=window, stride=stride)
    if e.kind == "span":
        raise EngineError("the span filter is a hard mask for extractive answers: the perplexity of text outside "
                          "the evidence is infinite. Use it on a QA task, or choose control=context|replug|tag_bias")
    if not 1 <= stride <= window:
        raise ValueError(f"perplexity stride={stride} must be between 1 and window={window}")
    cost = e.new_cost()
    t_wall = time.perf_counter()
    sched = e.schedule
    sched.reset(1, device=torch.device("cpu"))
    nll_none = torch.zeros(n - 1, dtype=torch.float64)
    nll = torch.zeros(n - 1, dtype=torch.float64)
    fires: list[int] = []
    seconds_none = 0.0
    c = e.control
    tags_now: Optional[tuple] = None
    ids_cpu = ids.cpu()
    pending_early = False  # a fire before position min_query_tokens - 1 waits for a long enough query
    text_query = e.kind in ("context", "replug", "latent_kv", "tags")

    def query_at(p: int) -> str:
        return e.decode(ids_cpu[max(0, p + 1 - e.query_tokens):p + 1].tolist())

    for begin, end, first in P.windows(n, window, stride):
        t0 = time.perf_counter()
        logits = e.model(input_ids=ids[begin:end].view(1, -1), use_cache=False).logits[0].float()
        seconds_none += time.perf_counter() - t0
        lp = torch.log_softmax(logits[first - begin:end - 1 - begin], -1)
        tg = ids[first + 1:end].view(-1, 1)
        nll_none[first:end - 1] = -lp.gather(1, tg).squeeze(1).double().cpu()
        probs = lp.exp().cpu() if sched.needs_probs else None
        local = []
        for p in range(first, end - 1):
            f = sched.should_fire(p, None if probs is None else probs[p - first:p - first + 1],
                                  ids_cpu[p].view(1) if p > 0 else None)
            if bool(f[0]) or (pending_early and p == e.min_query_tokens - 1):
                local.append(p)
                pending_early = False
            if bool(f[0]) and p < e.min_query_tokens - 1 and text_query:  # the query would be too short: defer
                local.pop()
                pending_early = True
        fires.extend(local)
        if e.kind != "tags":
            continue
        # tags: evidence retrieved at each firing position holds until the next; TagBias on the same scores
        hits = None
        if local:
            queries = [query_at(p) for p in local]
            hits = e.search(queries, cost)
            e.log_hits(hits, [0] * len(local), queries, None, [], positions=local)
        run_start, j = first, 0
        bounds = local + [end - 1]
        segs = []
        for p in bounds:
            if p > run_start:
                segs.append((run_start, p, tags_now))
            if p < end - 1:
                tags_now = e.tag_evidence(hits, j)
                j += 1
            run_start = p
        for a, b, ev in segs:
            rows = slice(a - first, b - first)
            if ev is None:
                nll[a:b] = nll_none[a:b]
                continue
            c.set_evidence([ev[0]], [ev[1]], start=None)
            lp_c = c.apply(logits[first - begin:end - 1 - begin][rows], input_ids=None, fire=None)
            nll[a:b] = -lp_c.gather(1, tg[rows]).squeeze(1).double().cpu()

    extra: dict[str, Any] = {}
    if e.kind in REBUILD_KINDS:
        hits_all = []
        for s0 in range(0, len(fires), 64):
            ps = fires[s0:s0 + 64]
            queries = [query_at(p) for p in ps]
            hits = e.search(queries, cost)
            e.log_hits(hits, [0] * len(ps), queries, None, [], positions=ps)
            hits_all.extend(passages_from_hits(hits, j) for j in range(len(ps)))
        nll[:] = nll_none
        if fires:
            nll[:fires[0]] = nll_none[:fires[0]]
        blocks: list[dict] = []
        owners: list[tuple[int, int, int]] = []  # (segment, view, block) for replug mixing
        seg_bounds = [(p, fires[i + 1] if i + 1 < len(fires) else n - 1) for i, p in enumerate(fires)]
        for si, ((a, b), ps) in enumerate(zip(seg_bounds, hits_all)):
            if a >= b or not ps:  # no evidence retrieved: the plain model's NLL stands
                continue
            if e.kind == "context":
                views = [ps]
            elif e.kind == "replug":
                views = [[p] for p in ps[: e.k]]
            else:
                views = [ps]
            for v, vps in enumerate(views):
                if e.kind == "latent_kv":
                    chunk_ids = [q.id for q in vps]
                    plen = c.prefix_length(chunk_ids)
                    if plen > window // 2:
                        raise EngineError(f"the injected chunks hold {plen} tokens, more than half the scoring "
                                          f"window ({window}); lower retrieval k or raise task.window")
                    bl = _blocks_for(ids_cpu, a, b, [], window - plen, stride)
                    for blk in bl:
                        blk["prefix"] = chunk_ids
                else:
                    prefix = e.encode(e.template.block(c.select(vps) if isinstance(c, ContextControl) else vps))
                    prefix = prefix[: window // 2]
                    bl = _blocks_for(ids_cpu, a, b, prefix, window, stride)
                for blk in bl:
                    owners.append((si, v, len(blocks)))
                    blocks.append(blk)
        lps = _score_blocks(e, blocks, cost)
        per_view: dict[tuple[int, int], dict[int, float]] = {}
        for (si, v, bi) in owners:
            c0, c1 = blocks[bi]["positions"]
            per_view.setdefault((si, v), {}).update(zip(range(c0, c1), lps[bi].tolist()))
        for si, ((a, b), ps) in enumerate(zip(seg_bounds, hits_all)):
            if a >= b or not ps:
                continue
            if e.kind == "replug":
                nv = min(e.k, len(ps))
                doc_lp = torch.tensor([[per_view[(si, v)][p] for v in range(nv)] for p in range(a, b)],
                                      dtype=torch.float64).unsqueeze(-1)
                sc = torch.tensor([[q.score for q in ps[:nv]]] * (b - a), dtype=torch.float64)
                mixed = replug_mix(doc_lp, sc, c.temperature).squeeze(-1)
                nll[a:b] = -mixed
            else:
                nll[a:b] = -torch.tensor([per_view[(si, 0)][p] for p in range(a, b)], dtype=torch.float64)
    elif e.kind == "knn_attention":
        fire_set = set(fires)
        c.attach(e.model, on_retrieval=lambda rows, i, s, sec: cost.__setitem__("retrieval_s", cost["retrieval_s"] + sec))
        try:
            for begin, end, first in P.windows(n, window, stride):
                c.active = torch.tensor([[p in fire_set for p in range(begin, end)]])
                t0 = time.perf_counter()
                logits = e.model(input_ids=ids[begin:end].view(1, -1), use_cache=False).logits[0].float()
                cost["model_s"] += time.perf_counter() - t0
                lp = torch.log_softmax(logits[first - begin:end - 1 - begin], -1)
                nll[first:end - 1] = -lp.gather(1, ids[first + 1:end].view(-1, 1)).squeeze(1).double().cpu()
        finally:
            c.detach()
        cost["retrievals"] += len(fires)
    elif e.kind == "verify":
        nll[:] = nll_none
        extra["note"] = ("verify acts on generated sentences (reject and regenerate); a fixed text has nothing to "
                         "regenerate, so its perplexity is the plain model's")
        fires = []
    elif e.kind != "tags":
        raise EngineError(f"scoring has no rule for control kind {e.kind!r}")
    cost["steps"] = n - 1
    if e.kind == "tags":
        cost["retrievals"] = len(fires)
    cost["wall_s"] = time.perf_counter() - t_wall
    cost["tokens"] = n - 1
    extra["cost"] = e.finish_cost(cost)
    extra["fire_positions"] = fires[:10000]
    n_bytes = len(e.tok.decode(ids_cpu[1:].tolist()).encode("utf-8"))
    return P.PerplexityResult(nll_none=nll_none.numpy().astype(np.float64), nll=nll.numpy().astype(np.float64),
                              n_bytes=n_bytes, seconds_none=seconds_none, seconds=cost["wall_s"], fired=len(fires),
                              extra=extra)

