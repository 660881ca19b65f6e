"""The decoding loop of one batch (:class:`Decoding`): schedule → control → cache → next token.

Per step t::

    fire = schedule.should_fire(t, p_t, x_{t-1})          (per row; asked before the forward
                                                          unless the schedule reads p_t)
    rows that fire: control.on_fire(run, rows)            (retrieve with a text query, keep evidence;
                                                          a control that retrieves_itself is only counted)
    control.rebuilds_prompt: the firing rows are re-prefilled from control.prompt_passages /
                            control.kv_prefix + the tokens they generated; a row keeps its
                            cached KV up to its first changed token (:meth:`Decoding.refresh`)
    control.before_forward(firing views); the cache is brought up to date
    log p = control.logprobs(run, logits, fire); the next token is chosen
    rows that finished: control.after_step(run, rows)     (verify checks and may roll back)

The control reads and writes the run through a small surface: ``passages[b]`` and
``has_evidence[b]`` (its evidence), ``retrieve(rows)``, ``record(row, **fields)`` (provenance),
``generated_ids()``, ``roll_back(row, start)``, ``engine`` (encode, decode, search, template),
``B``, ``n_views`` (views per row), ``step_no``, ``gen``, ``reqs``, ``cost``, ``in_generate`` (True inside
``model.generate``, which cannot take tokens back).
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from rcd.engine.cache import (CacheState, common_prefix, drop_last, kept_prefix, length_groups, plain_layers,
                              splice)
from rcd.engine.query import hit_labels


class Decoding:
    """State of one decoding batch: per-row tokens, evidence, cache; and the loop."""

    phase = "generate"

    def __init__(self, engine, reqs: list, max_new: int, template=None, in_generate: bool = False) -> None:
        self.engine = engine
        self.control = engine.control
        self.template = template or engine.template
        self.reqs = reqs
        self.B = len(reqs)
        self.max_new = max_new
        self.n_views = self.control.views(engine.k) if self.control is not None else 1
        self.gen: list[list[int]] = [[] for _ in reqs]
        self.done = [False] * self.B
        self.passages: list[list] = [[] for _ in reqs]
        self.has_evidence = torch.zeros(self.B, dtype=torch.bool)
        self.skip_fire = [False] * self.B
        self.retrieved: list[list[str]] = [[] for _ in reqs]
        self.fired = [0] * self.B
        self.cost = engine.new_cost()
        self.state: Optional[CacheState] = None
        self.pending: Optional[torch.Tensor] = None  # token chosen, not yet fed
        self.step_no = 0
        self.gen_seed = torch.Generator(device="cpu").manual_seed(engine.seed)
        self.firing_views: Optional[torch.Tensor] = None  # [B*V] views whose schedule fired this step
        self.in_generate = bool(in_generate)
        self.dirty: set[int] = set()  # rows whose prompt changed: re-prefilled at the next ensure_logits
        #: per view, the token ids its cache row holds (None: unknown, e.g. after an injected KV prefix)
        self.cached: list[Optional[list[int]]] = [None] * (self.B * self.n_views)
        if self.control is not None:
            self.control.begin(self)

    # ---------------------------------------------------------------- what the control may use
    def record(self, row: int, **fields) -> None:
        """Append a provenance record for ``row`` at this step."""
        e = self.engine
        rec = {"task": e.task, "strategy": e.name, "control": e.control_name, "id": self.reqs[row].id,
               "row": int(row), "step": self.step_no}
        rec.update(fields)
        e.provenance.append(rec)

    def generated_ids(self) -> torch.Tensor:
        """The tokens generated so far [B, max length], left-padded."""
        width = max(len(g) for g in self.gen)
        ids = torch.full((self.B, width), self.engine.pad_id, dtype=torch.long)
        for b, g in enumerate(self.gen):
            if g:
                ids[b, width - len(g):] = torch.tensor(g)
        return ids

    def roll_back(self, row: int, start: int) -> None:
        """Take back row ``row``'s tokens from ``start`` on; it is re-prefilled and decodes again."""
        self.gen[row] = self.gen[row][:start]
        self.done[row] = False
        self.skip_fire[row] = True
        self.dirty.add(row)

    def retrieve(self, rows: list[int], sentences: Optional[dict] = None):
        """Search with each row's text query (``sentences``: row -> token ids the query is built on)."""
        e = self.engine
        queries = [e.build_query(self.reqs[b], self.gen[b], self.step_no,
                                 sentence=None if sentences is None else sentences.get(b)) for b in rows]
        hits = e.search(queries, self.cost)
        e.log_hits(hits, rows, queries, self.step_no, self.reqs)
        for j, b in enumerate(rows):
            self.fired[b] += 1
            self.retrieved[b].extend(hit_labels(hits, j))
        return hits

    def query_ids(self, row: int) -> list[int]:
        """The last ``query_tokens`` token ids of row ``row``'s prompt + generation (a hidden-state query)."""
        e = self.engine
        return (e.encode(self.reqs[row].prompt) + list(self.gen[row]))[-e.query_tokens:]

    def count_retrieval(self, rows: list[int], labels: list[list[str]], seconds: float) -> None:
        """A control that searched on its own (not through :meth:`retrieve`) reports it here."""
        self.cost["retrievals"] += len(rows)
        self.cost["retrieval_s"] += seconds
        for b, lab in zip(rows, labels):
            self.fired[b] += 1
            self.retrieved[b].extend(lab)

    # ---------------------------------------------------------------- prompts and cache
    def seqs(self, rows: Optional[Sequence[int]] = None) -> list[list[int]]:
        """Token ids each view reads: its prompt (with the row's evidence) + the row's generated tokens."""
        e, c = self.engine, self.control
        out = []
        for b in (range(self.B) if rows is None else rows):
            req = self.reqs[b]
            views = c.prompt_passages(self, b) if c is not None else [()]
            if len(views) != self.n_views:
                raise RuntimeError(f"{type(c).__name__}.prompt_passages gave {len(views)} views for row {b}; "
                                   f"views(k) said {self.n_views}")
            for ps in views:
                out.append(e.prompt_ids(req.prompt, ps, self.template) + self.gen[b])
        return out

    def views_of(self, rows: Sequence[int]) -> list[int]:
        return [b * self.n_views + v for b in rows for v in range(self.n_views)]

    def prefill_rows(self, rows: Sequence[int]) -> CacheState:
        """A fresh prefill of ``rows`` (their views' cached ids are recorded for later reuse)."""
        c = self.control
        seqs = self.seqs(rows)
        prefix = c.kv_prefix(self, list(rows), self.cost) if c is not None else None
        for v, s in zip(self.views_of(rows), seqs):
            self.cached[v] = None if prefix is not None else list(s)
        return self.engine.prefill(seqs, self.cost, prefix=prefix)

    def _before_forward(self) -> None:
        if self.control is not None:
            self.control.before_forward(self.firing_views)

    def _step(self, tokens: torch.Tensor) -> None:
        self.state = self.engine.step(self.state, tokens, self.cost)
        for v, t in enumerate(tokens.tolist()):
            if self.cached[v] is not None:
                self.cached[v].append(int(t))

    def redo_last(self) -> None:
        """Recompute the last cached position (the control's hooks changed since it was computed)."""
        for ids in self.cached:
            if ids is not None:
                ids.pop()
        last = self.state.last
        self.state = drop_last(self.state)
        self._step(last)

    def rebuild(self) -> None:
        self._before_forward()
        self.state = self.prefill_rows(range(self.B))
        self.pending = None
        self.dirty.clear()

    def reusable(self) -> bool:
        """Whether the cached KV stays valid for a re-prefilled row's unchanged tokens: no control hook
        changes the forward pass."""
        c = self.control
        return self.state is not None and not (c is not None and c.acts_in_forward)

    def refresh(self, rows: Sequence[int], pending: Optional[torch.Tensor] = None) -> None:
        """Re-prefill ``rows`` (their prompt changed) and splice them into the batch cache.

        Each view reuses its cached KV up to the first token where its new sequence differs (a view
        whose sequence did not change costs nothing); this equals a fresh prefill of the new
        sequence. The changed tails are forwarded in groups of similar length (:func:`length_groups`).
        ``pending``: the tokens chosen last, not yet fed (every row is being refreshed);
        when no view's sequence changed they are fed as one decoding step. Rows with an injected KV
        prefix are prefilled from scratch; a cache that cannot be cropped or spliced (sliding-window
        layers) re-prefills the batch."""
        c = self.control
        views = self.views_of(rows)
        seqs = self.seqs(rows)
        prefix = c.kv_prefix(self, list(rows), self.cost) if c is not None else None
        if prefix is None and self.reusable() and all(self.cached[v] is not None for v in views):
            if pending is not None:
                tokens = pending.repeat_interleave(self.n_views)
                if all(self.cached[v] + [int(tokens[v])] == s for v, s in zip(views, seqs)):
                    self._step(tokens)
                    return
            todo = [(v, s) for v, s in zip(views, seqs) if self.cached[v] != s]
            if not todo:
                return
            if plain_layers(self.state.cache):
                kept = [min(common_prefix(self.cached[v], s), len(s) - 1) for v, s in todo]
                tails = [s[k:] for (_, s), k in zip(todo, kept)]
                for group in length_groups([len(t) for t in tails]):  # tails of similar length together
                    sub_views = [todo[i][0] for i in group]
                    sub = self.engine.prefill([tails[i] for i in group], self.cost,
                                              prefix=kept_prefix(self.state, sub_views, [kept[i] for i in group]))
                    self.state = splice(self.state, sub, sub_views)
                self.cost["reused_tokens"] += sum(kept)
                for v, s in todo:
                    self.cached[v] = list(s)
                return
        for v, s in zip(views, seqs):
            self.cached[v] = None if prefix is not None else list(s)
        if len(rows) == self.B:  # every row is re-prefilled: this prefill is the batch's new cache
            self.state = self.engine.prefill(seqs, self.cost, prefix=prefix)
        elif plain_layers(self.state.cache):
            self.state = splice(self.state, self.engine.prefill(seqs, self.cost, prefix=prefix), views)
        else:  # rows of a sliding-window cache cannot be spliced: re-prefill the batch
            self.rebuild()

    def ensure_logits(self) -> None:
        """Bring the cache up to date: a full prefill, or feed the pending token and re-prefill dirty
        rows (when every row is dirty the re-prefill feeds the pending tokens itself)."""
        if self.state is None or (len(self.dirty) == self.B and not self.reusable()):
            self.rebuild()
            return
        if self.pending is None and not self.dirty:
            return
        self._before_forward()
        pending, self.pending = self.pending, None
        if pending is not None and len(self.dirty) < self.B:
            self._step(pending.repeat_interleave(self.n_views))
            pending = None
        if self.dirty:
            rows = sorted(self.dirty)
            self.dirty.clear()
            self.refresh(rows, pending)

    def last_tokens(self) -> Optional[torch.Tensor]:
        if self.step_no == 0:
            return None
        return torch.tensor([g[-1] if g else self.engine.pad_id for g in self.gen], dtype=torch.long)

    # ---------------------------------------------------------------- one step
    def act(self, fire: torch.Tensor) -> None:
        """The control acts for the firing rows (a self-retrieving control is only counted)."""
        rows = [b for b in range(self.B) if bool(fire[b])]
        c = self.control
        if c.retrieves_itself:
            for b in rows:
                self.fired[b] += 1
            self.cost["retrievals"] += len(rows)
            return
        c.on_fire(self, rows)

    def decide_and_act(self) -> torch.Tensor:
        """Ask the schedule for step ``step_no`` and let the control act on the firing rows."""
        sched, c = self.engine.schedule, self.control
        active = torch.tensor([not d for d in self.done])
        self.cost["steps"] += int(active.sum())
        fire = torch.zeros(self.B, dtype=torch.bool)
        if sched is not None:
            if sched.needs_probs:
                self.firing_views = torch.zeros(self.B * self.n_views, dtype=torch.bool)
                self.ensure_logits()
                lp0 = torch.log_softmax(self.state.logits.view(self.B, self.n_views, -1)[:, 0], -1)
                fire = sched.should_fire(self.step_no, lp0.exp().cpu(), self.last_tokens()).cpu()
            else:
                fire = sched.should_fire(self.step_no, None, self.last_tokens()).cpu()
            fire = fire & active & ~torch.tensor(self.skip_fire, dtype=torch.bool)
        self.skip_fire = [False] * self.B
        self.firing_views = fire.repeat_interleave(self.n_views)
        if bool(fire.any()) and c is not None:
            self.act(fire)
            if c.rebuilds_prompt:
                self.dirty.update(b for b in range(self.B) if bool(fire[b]))
            elif c.acts_in_forward and self.state is not None and self.pending is None:
                # the schedule read p_t, computed before the control acted: recompute the last position
                self._before_forward()
                if self.step_no > 0:
                    self.redo_last()
                else:
                    self.state = None
        return fire

    def logprobs(self, fire: torch.Tensor) -> torch.Tensor:
        logits = self.state.logits  # [B*n_views, vocab]
        if self.control is None:
            return torch.log_softmax(logits, -1)
        return self.control.logprobs(self, logits, fire)

    def choose(self, lp: torch.Tensor) -> torch.Tensor:
        e = self.engine
        if e.do_sample:
            probs = torch.softmax(lp.float().cpu() / e.temperature, -1)
            return torch.multinomial(probs, 1, generator=self.gen_seed).view(-1)
        return lp.argmax(-1).cpu()

    # ---------------------------------------------------------------- the loop
    def loop(self) -> None:
        e, sched, c = self.engine, self.engine.schedule, self.control
        t_start = time.perf_counter()
        if sched is not None:
            sched.reset(self.B, device=torch.device("cpu"))
        budget = c.step_budget(self.max_new) if c is not None else self.max_new + 1
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
            finished = []
            for b in range(self.B):
                if self.done[b]:
                    nxt[b] = e.pad_id
                    continue
                tok = int(nxt[b])
                self.gen[b].append(tok)
                if (e.stop_at_eos and tok in e.eos_ids) or len(self.gen[b]) >= self.max_new:
                    self.done[b] = True
                    finished.append(b)
            if finished and c is not None:
                c.after_step(self, finished)
            self.step_no += 1
            if all(self.done) or self.step_no >= budget:
                break
            if self.state is not None:
                self.pending = nxt
        self.cost["tokens"] = sum(len(g) for g in self.gen)
        self.cost["wall_s"] = time.perf_counter() - t_start
