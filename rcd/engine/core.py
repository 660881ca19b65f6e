"""The engine: runs a strategy (datastore × control × schedule) for generation, QA and scoring.

It knows nothing about any particular control: it calls the control protocol
(:mod:`rcd.control.base`). This module holds the configuration and the shared services (prompt
rendering and fitting, queries, search and its provenance, cache calls); the loop is
:class:`rcd.engine.decoding.Decoding`, scoring :class:`rcd.engine.scoring.Scorer`.

Cost and provenance
-------------------
Every run returns a cost dict: ``retrievals`` (row retrievals), ``retrieval_s``, ``model_s``,
``tokens`` (generated, eos included), ``ttft`` (seconds to the first token of the batch),
``tokens_per_s`` (tokens / wall seconds, retrieval included), ``steps`` (row-steps asked) and
``retrieval_rate`` = retrievals / steps, ``reused_tokens`` (positions a re-prefill took from the
row's own cache instead of recomputing them, :meth:`rcd.engine.decoding.Decoding.refresh`). Each
retrieval appends a provenance record ``{task, strategy, control, phase, id, row, step, query, ids,
doc_ids, scores}``; controls add their own (kNN neighbours, verify decisions).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from rcd.control.base import check_protocol
from rcd.control.context import PromptTemplate
from rcd.engine import cache
from rcd.engine.cache import CacheState
from rcd.engine.decoding import Decoding
from rcd.engine.query import QUERY_MODES, build_query, tag_evidence
from rcd.engine.scoring import Scorer
from rcd.errors import RcdError

#: what to do with a prompt that does not fit the context (``task.long_prompt``)
LONG_PROMPT = ("drop_passages", "truncate_left", "refuse")


class EngineError(RcdError):
    pass


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

    #: which engine runs the forwards (``engine=hf|vllm``)
    kind = "hf"

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
        c = self.control
        if c is not None:
            check_protocol(type(c))
            if self.datastore is None:
                self.datastore = getattr(c, "datastore", None)
            if self.datastore is None:
                raise EngineError(f"strategy {self.name!r}: control {type(c).__name__} needs a datastore")
        #: the control's name in provenance records ("none" without one)
        self.control_name = "none" if c is None else str(getattr(c, "name", None) or type(c).__name__)
        if self.schedule is None and c is not None:
            from rcd.schedule import EveryToken, Once

            self.schedule = EveryToken() if c.retrieves_itself else Once()
        if self.schedule is not None and getattr(self.schedule, "needs_tokenizer", False) \
                and getattr(self.schedule, "bound_tokenizer", None) is None:
            self.schedule.bind_tokenizer(self.tok)  # one the caller bound itself is kept
        base = template or PromptTemplate()
        self.template = c.template(base) if c is not None else base
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
        if c is not None:
            c.bind(datastore=self.datastore)
            c.prepare(lm, sorted(self.eos_ids))  # fails at start-up when the model cannot take the control

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def new_cost(self) -> dict[str, Any]:
        return {"retrievals": 0, "retrieval_s": 0.0, "model_s": 0.0, "tokens": 0, "ttft": None, "steps": 0,
                "wall_s": 0.0, "reused_tokens": 0}

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

    def prompt_ids(self, prompt: str, passages: Sequence = (), template: Optional[PromptTemplate] = None
                   ) -> list[int]:
        """Token ids of ``prompt`` with ``passages`` under the template, fitted to the context by the
        ``long_prompt`` policy: ``drop_passages`` drops the lowest-ranked passages until the prompt fits
        and then keeps its last tokens; ``truncate_left`` keeps the last tokens; ``refuse`` raises.
        Every prompt that had to be fitted is counted once (:meth:`fit_counts`)."""
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

    def build_query(self, req: "Request", gen: Sequence[int], step: int, sentence: Optional[Sequence[int]] = None) -> str:
        """The retrieval query of one row (:mod:`rcd.engine.query`)."""
        base = req.query if req.query is not None else req.prompt
        return build_query(self.query_mode, base, lambda: self.encode(req.prompt), gen, step, self.decode,
                           self.query_tokens, sentence=sentence)

    # ------------------------------------------------------------------ retrieval
    def search(self, queries: list[str], cost: dict):
        t0 = time.perf_counter()
        if self.control is not None and self.control.retrieves_itself:
            raise EngineError(f"{type(self.control).__name__} retrieves inside its own hooks, not by text query")
        hits = self.datastore.search(list(queries), self.k)
        cost["retrieval_s"] += time.perf_counter() - t0
        cost["retrievals"] += len(queries)
        return hits

    def log_hits(self, hits, rows: Sequence[int], queries: Sequence[str], step, reqs: Sequence[Request],
                 positions: Optional[Sequence[int]] = None) -> None:
        for j, (r, q) in enumerate(zip(rows, queries)):
            rec = {"task": self.task, "strategy": self.name, "control": self.control_name,
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
        """(token ids, weight) of the retrieved tags of one row (:func:`rcd.engine.query.tag_evidence`)."""
        return tag_evidence(hits, row, self.tok, self.encode, self.tag_format)

    # ------------------------------------------------------------------ model calls (rcd.engine.cache)
    def prefill(self, seqs: list[list[int]], cost: dict, prefix=None) -> CacheState:
        """Left-padded prefill of ``seqs`` (after an optional injected KV ``prefix``)."""
        return cache.prefill(self.model, self.pad_id, self.device, seqs, cost, prefix=prefix)

    def forward_padded(self, seqs: list[list[int]], cost: dict, prefix=None, keep: int = 1):
        """One forward over left-padded ``seqs``; logits of the last ``keep`` positions of every row."""
        return cache.forward_padded(self.model, self.pad_id, self.device, seqs, cost, prefix=prefix, keep=keep)

    def step(self, state: CacheState, tokens: torch.Tensor, cost: dict) -> CacheState:
        return cache.step(self.model, self.device, state, tokens, cost)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, requests: Sequence[Request | str], max_new_tokens: Optional[int] = None) -> Output:
        """Decode every request (in batches of ``batch_size``); texts exclude the prompt and eos."""
        reqs = [r if isinstance(r, Request) else Request(prompt=str(r)) for r in requests]
        self._fitted.clear()
        outs = [self._generate_batch(reqs[i:i + self.batch_size], max_new_tokens or self.max_new_tokens, i)
                for i in range(0, len(reqs), self.batch_size)]
        cost = self.new_cost()
        for o in outs:  # counters add up over batches (an engine's own counters too, e.g. vLLM's)
            for key, v in o.cost.items():
                if key != "ttft" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    cost[key] = cost.get(key, 0) + v
        ttfts = [o.cost["ttft"] for o in outs if o.cost["ttft"] is not None]
        cost["ttft"] = sum(ttfts) / len(ttfts) if ttfts else None
        cost["batches"] = len(outs)
        cost.update(self.fit_counts())
        return Output(texts=[t for o in outs for t in o.texts], token_ids=[t for o in outs for t in o.token_ids],
                      cost=self.finish_cost(cost), provenance=[p for o in outs for p in o.provenance],
                      retrieved=[t for o in outs for t in o.retrieved], fired=[f for o in outs for f in o.fired])

    def _generate_batch(self, reqs: list[Request], max_new: int, offset: int) -> Output:
        run = Decoding(self, reqs, max_new)
        n_prov = len(self.provenance)
        c = self.control
        if c is not None:
            c.attach(self.model, run)
        try:
            run.loop()
        finally:
            if c is not None:
                c.detach()
        for rec in self.provenance[n_prov:]:
            if "row" in rec:
                rec["row"] += offset
        texts = [self.decode([t for t in g if t not in self.eos_ids]) for g in run.gen]
        return Output(texts=texts, token_ids=[list(g) for g in run.gen], cost=run.cost,
                      provenance=self.provenance[n_prov:], retrieved=run.retrieved, fired=run.fired)

    # ------------------------------------------------------------------ model.generate adapter
    def processor(self):
        """A LogitsProcessor that runs this strategy inside ``model.generate`` (:mod:`rcd.engine.processor`)."""
        from rcd.engine.processor import processor_for

        return processor_for(self)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor, *, window: int = 512, stride: int = 256):
        """Per-token NLL of ``token_ids`` plain and under the strategy -> ``PerplexityResult``."""
        return Scorer(self, token_ids, window=window, stride=stride).run()


def from_config(lm, strategy, cfg=None, *, task: str = "generate", provenance: Optional[list] = None,
                **overrides: Any) -> Engine:
    """An :class:`Engine` for ``strategy`` with ``strategy.retrieval`` and ``task.template`` of ``cfg``; a
    :class:`rcd.engine.vllm_engine.VllmEngine` when ``cfg.engine.name`` is ``vllm``.

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
    node = section("engine")
    kind = node.get("name", "hf")
    if kind == "vllm":
        from rcd.engine.vllm_engine import VllmEngine

        return VllmEngine(lm, strategy, task=task, provenance=provenance, vllm=node, **kwargs)
    if kind != "hf":
        raise EngineError(f"engine.name={kind!r} is not one of ['hf', 'vllm'] (engine=hf|vllm)")
    return Engine(lm, strategy, task=task, provenance=provenance, **kwargs)
