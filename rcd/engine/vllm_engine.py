"""The vLLM engine (``engine=vllm``): rcd's strategies on a serving engine, behind the same configs.

:class:`VllmEngine` is an :class:`rcd.engine.Engine` (prompts, templates, queries, search, provenance and
cost are the same code) whose forwards run in vLLM. What it runs, and how:

* ``none`` and **context controls** (``once``, ``every_n``, ``per_sentence``, ``adaptive``, ``tags`` as
  context ...; any control that only renders passages into the prompt) with **every schedule**: each row is
  generated in segments. A segment is submitted as token ids (the row's prompt with its passages + the
  tokens it generated, never re-tokenized) with vLLM's prefix caching on; the schedule is then asked at
  every step of the segment, in order, with the segment's tokens (and, for a schedule that reads p_t, the
  probability vLLM reports). At the first step that fires, the segment is cut there, the control retrieves
  (the same ``on_fire``/``prompt_passages`` as on the HF engine) and the next segment starts from the new
  prompt. Greedy, this gives the tokens of the HF decoding loop: every token is chosen from the same
  conditional. A schedule may say how many steps it will not fire (``Schedule.quiet_steps``); other
  segments are ``engine.segment_tokens`` long.
* **tag bias** (``tags``, continuation included) and the **span filter**: segments as above; the row's
  evidence after each firing (the control's ``vllm_evidence``) goes with each segment (``vllm_args``) to
  :class:`rcd.engine.vllm_plugin.TagBiasMixture` / :class:`rcd.engine.vllm_plugin.SpanFilterMask`, which run
  the control's own ``apply`` inside vLLM.
* **kNN-LM** (``per_token``): a tokens datastore keyed at ``layer=final`` is mixed inside vLLM by
  :class:`rcd.engine.vllm_plugin.KnnMixture`, λ, k and T per request (``SamplingParams.extra_args``).
* **Perplexity** (``task=lm``) of ``none`` and kNN-LM from vLLM's prompt log-probabilities, in the windows
  of :func:`rcd.engine.scoring.windows`; kNN-LM's query states come from vLLM's logits layer.

Everything else (logits controls other than kNN-LM, KV injection, multi-view controls, a control that
takes tokens back, adaptive on entropy) is refused at start-up, naming ``engine=hf``.

``trace`` (a list) receives ``{row, step, token, logprob, top_logprob}`` per generated token: vLLM's log p of
the token it chose and of the most probable token (after rcd's logits processors), for parity checks against
the HF engine's trace and for calibrating adaptive's θ (:func:`rcd.calibrate.engine_confidences`).

Cost: the engine's cost dict plus vLLM's counters: ``prompt_tokens`` (tokens submitted),
``cached_tokens`` (of those, served from vLLM's prefix cache: ``reused_tokens``), ``prefilled_tokens``
(recomputed), ``vllm_calls``, ``segments``; ``ttft`` is vLLM's time to first token of the first segments.

One vLLM ``LLM`` serves a process (:func:`shared_llm`, keyed by model and engine settings); rcd runs vLLM's
engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the logits processor reads the datastore
rcd loaded. A script that starts vLLM itself needs ``if __name__ == "__main__":``.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import numpy as np
import torch

from rcd.control.base import Control
from rcd.engine.core import Engine, EngineError, Output, Request
from rcd.engine.decoding import Decoding
from rcd.engine.scoring import PerplexityResult, windows

#: engine.* keys of conf/engine/vllm.yaml (what :class:`VllmSettings` reads)
SETTINGS = ("name", "segment_tokens", "max_model_len", "kv_cache_gib", "gpu_memory_utilization", "enforce_eager",
            "prefix_caching", "max_num_seqs")


@dataclass(frozen=True)
class VllmSettings:
    """``engine.*`` of ``engine=vllm``: ``segment_tokens`` (tokens asked per segment when the schedule does not
    say when it fires next), ``max_model_len`` (null: the model's context), ``kv_cache_gib`` (CPU KV cache,
    ``VLLM_CPU_KVCACHE_SPACE``), ``gpu_memory_utilization`` (CUDA), ``enforce_eager``, ``prefix_caching``,
    ``max_num_seqs`` (rows vLLM batches at once)."""

    segment_tokens: int = 16
    max_model_len: Optional[int] = None
    kv_cache_gib: float = 2.0
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = True
    prefix_caching: bool = True
    max_num_seqs: int = 64

    @classmethod
    def from_config(cls, node: Optional[dict]) -> "VllmSettings":
        node = dict(node or {})
        unknown = sorted(set(node) - set(SETTINGS))
        if unknown:
            raise EngineError(f"engine: unknown key(s) {unknown}; engine=vllm reads {list(SETTINGS)}")
        node.pop("name", None)
        s = cls(**node)
        if int(s.segment_tokens) < 1 or int(s.max_num_seqs) < 1:
            raise EngineError(f"engine.segment_tokens={s.segment_tokens} and engine.max_num_seqs={s.max_num_seqs} "
                              "must be >= 1")
        if float(s.kv_cache_gib) <= 0 or not 0 < float(s.gpu_memory_utilization) <= 1:
            raise EngineError(f"engine.kv_cache_gib={s.kv_cache_gib} must be > 0 and "
                              f"engine.gpu_memory_utilization={s.gpu_memory_utilization} in (0, 1]")
        return s


def vllm_available() -> Optional[str]:
    """None when vLLM imports here, else why not (the reason tests skip with)."""
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means: not usable here
        return f"vllm does not import here ({type(e).__name__}: {e}); install rcd[vllm] (make setup)"
    return None


_LLMS: dict[tuple, Any] = {}


def _unscannable_modules() -> list[str]:
    """Modules holding a value vLLM 0.32's kernel registration cannot scan: at engine start it walks every module
    in ``sys.modules`` and calls ``vars(value).get`` on each attribute with a ``__dict__``, which fails on
    llvmlite's ctypes wrappers (imported with numba, e.g. by bm25s) and would stop the engine from starting."""
    bad = []
    for name, module in list(sys.modules.items()):
        ns = getattr(module, "__dict__", None)
        if not isinstance(ns, dict):
            continue
        for value in list(ns.values()):
            try:
                if hasattr(value, "__dict__") and not hasattr(vars(value), "get"):
                    bad.append(name)
                    break
            except Exception:  # noqa: BLE001 - vars() itself failing breaks vLLM's scan just the same
                bad.append(name)
                break
    return bad


@contextmanager
def _hidden_from_vllms_scan():
    """Take :func:`_unscannable_modules` out of ``sys.modules`` while vLLM starts, and put them back."""
    hidden = {name: sys.modules.pop(name) for name in _unscannable_modules()}
    try:
        yield
    finally:
        for name, module in hidden.items():
            sys.modules.setdefault(name, module)


def shared_llm(lm, settings: VllmSettings):
    """The process's vLLM ``LLM`` for model ``lm`` under ``settings`` (started once, ~20 s for SmolLM2 on a
    2-core CPU). The model must be a folder or hub id vLLM can load (``lm.source``)."""
    max_len = settings.max_model_len or lm.context_length or 2048
    key = (str(lm.source), str(lm.dtype), int(max_len), replace(settings, segment_tokens=1))  # what vLLM is started with
    llm = _LLMS.get(key)
    if llm is not None:
        return llm
    why = vllm_available()
    if why:
        raise EngineError(f"engine=vllm: {why}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process (module doc)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(math.ceil(settings.kv_cache_gib))))  # CPU: the KV cache
    from rcd.engine import vllm_plugin

    vllm_plugin.register()
    if not os.path.isdir(str(lm.source)) and "/" not in str(lm.source):
        raise EngineError(f"engine=vllm: model {lm.name!r} has no folder or hub id vLLM can load "
                          f"(source {lm.source!r}); save it with save_pretrained and give model.name=<folder>")
    for old in list(_LLMS):  # one engine per process: a new model or setting replaces the old one
        del _LLMS[old]
    dtype = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(
        str(lm.dtype), str(lm.dtype).replace("torch.", ""))
    with _hidden_from_vllms_scan():
        llm = _start(lm, dtype, max_len, settings)
    _LLMS[key] = llm
    return llm


def _start(lm, dtype: str, max_len: int, settings: VllmSettings):
    from vllm import LLM

    from rcd.engine import vllm_plugin

    return LLM(model=str(lm.source), dtype=dtype, max_model_len=int(max_len), enforce_eager=settings.enforce_eager,
               enable_prefix_caching=settings.prefix_caching,
               # CUDA: the share of GPU memory vLLM takes; on the CPU only a start-up check of free memory (the KV
               # cache is kv_cache_gib), kept low so that other processes' memory does not stop the engine
               gpu_memory_utilization=settings.gpu_memory_utilization if torch.cuda.is_available() else 0.1,
               max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=max(int(max_len), 2048),
               skip_tokenizer_init=True, seed=0, disable_log_stats=False, logprobs_mode="processed_logprobs",
               max_logprobs=1,
               logits_processors=[vllm_plugin.KnnMixture, vllm_plugin.TagBiasMixture, vllm_plugin.SpanFilterMask])


def refusal(control, schedule, task: str) -> Optional[str]:
    """Why vLLM cannot run this cell (None: it can). Decided from the control protocol, never a name."""
    if control is None:
        return None
    cls = type(control)
    label = cls.__name__
    has_form = getattr(control, "vllm_args", None) is not None  # a logits control with a vLLM form
    why = control.vllm_refusal() if has_form and hasattr(control, "vllm_refusal") else None
    if why:
        return f"control {label}: {why}"
    if has_form and control.retrieves_itself:  # kNN-LM: searches inside vLLM's logits processor, every token
        if schedule is not None and not every_step(schedule):
            return (f"control {label} mixes inside vLLM at every token; schedule {type(schedule).__name__} fires at "
                    "some steps only")
        return None
    if has_form:  # evidence-driven logits control (tag bias, span filter): its processor runs inside vLLM
        return _schedule_refusal(schedule) or _lm_refusal(label, task)
    if control.views(1) != 1 or control.views(8) != 1:
        return (f"control {label} combines several views (prompts) per row at every step; vLLM's batch-level "
                "logits processor sees the rows of one step but vLLM does not promise to schedule a request's "
                "views together (preemption, chunked prefill), so their mixture cannot be kept in lockstep")
    overridden = [m for m in ("logprobs", "kv_prefix", "attach", "after_step", "before_forward")
                  if getattr(cls, m) is not getattr(Control, m)]
    if overridden or control.acts_in_forward or control.rolls_back or control.retrieves_itself:
        return (f"control {label} acts in the model's forward pass or its distribution ({', '.join(overridden) or 'hooks'}"
                "); vLLM runs controls that only put passages into the prompt, and kNN-LM")
    if not control.rebuilds_prompt:
        return f"control {label} does not change the prompt"
    return _schedule_refusal(schedule) or _lm_refusal(label, task)


def _lm_refusal(label: str, task: str) -> Optional[str]:
    if task == "lm":
        return f"control {label}: perplexity on vLLM covers none and kNN-LM (per_token) only"
    return None


def _schedule_refusal(schedule) -> Optional[str]:
    if schedule is not None and schedule.needs_probs and getattr(schedule, "probs_read", "full") != "max":
        return (f"schedule {type(schedule).__name__} reads the whole next-token distribution; vLLM reports the top "
                "token's probability only (adaptive mode=max_prob reads just that)")
    return None


def every_step(schedule) -> bool:
    """Whether ``schedule`` fires at every step whatever the tokens (a token-independent all-True mask)."""
    if schedule.needs_probs or getattr(schedule, "needs_tokenizer", False):
        return False
    probe = copy.copy(schedule)
    probe.reset(1)
    return bool(probe.fire_mask(None, torch.zeros(1, 64, dtype=torch.long)).all())


class _Row(Decoding):
    """One row's decoding state on vLLM: the evidence surface of :class:`Decoding` (``passages``,
    ``retrieve``, ``record``, ``seqs`` ...) for B = 1, with its own copy of the schedule."""

    def __init__(self, engine, req: Request, max_new: int, schedule, index: int) -> None:
        super().__init__(engine, [req], max_new)
        self.schedule = schedule
        self.index = index  # the row's number in the engine's call (provenance)
        self.decided = False  # the schedule was asked at step len(gen) already (it fired there)
        self.evidence = None  # the control's vllm_evidence(run, 0) after the row's last firing

    @property
    def step(self) -> int:
        return len(self.gen[0])


class VllmEngine(Engine):
    """An :class:`Engine` whose forwards run in vLLM (module doc). ``vllm``: :class:`VllmSettings` fields.
    Sampling (``do_sample``) draws with vLLM's generator: the same distribution as ``engine=hf``, other draws."""

    kind = "vllm"

    def __init__(self, lm, strategy=None, *, vllm: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(lm, strategy, **kwargs)
        self.settings = vllm if isinstance(vllm, VllmSettings) else VllmSettings.from_config(vllm)
        why = refusal(self.control, self.schedule, self.task)
        if why:
            raise EngineError(f"engine=vllm cannot run strategy {self.name!r}: {why}; run it with engine=hf")
        self._llm = None

    @property
    def llm(self):
        if self._llm is None:
            self._llm = shared_llm(self.lm, self.settings)
        return self._llm

    def processor(self):
        raise EngineError("engine=vllm: a strategy inside model.generate is the HF engine's path; use engine=hf")

    # ------------------------------------------------------------------ vLLM calls
    def _params(self, max_tokens: int, *, logprobs: bool, seed: int = 0, extra=None, prompt_logprobs=None):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=int(max_tokens), temperature=self.temperature if self.do_sample else 0.0,
                              seed=seed if self.do_sample else None, logprobs=1 if logprobs else None,
                              prompt_logprobs=prompt_logprobs, ignore_eos=True, detokenize=False,
                              stop_token_ids=sorted(self.eos_ids) if self.stop_at_eos else None,
                              extra_args=extra)

    def _submit(self, prompts: list[list[int]], params: list, cost: dict) -> list:
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        cost["model_s"] += time.perf_counter() - t0
        cost["vllm_calls"] = cost.get("vllm_calls", 0) + 1
        for p, o in zip(prompts, outs):
            cached = int(o.num_cached_tokens or 0)
            cost["prompt_tokens"] = cost.get("prompt_tokens", 0) + len(p)
            cost["cached_tokens"] = cost.get("cached_tokens", 0) + cached
            cost["prefilled_tokens"] = cost.get("prefilled_tokens", 0) + len(p) - cached
        return outs

    def _extra(self, row: Optional[_Row] = None) -> Optional[dict]:
        """``extra_args`` of a request: the control's vLLM form for the row's evidence and tokens (None: none)."""
        c = self.control
        if c is None or getattr(c, "vllm_args", None) is None:
            return None
        return c.vllm_args(self, None if row is None else row.evidence, [] if row is None else row.gen[0])

    # ------------------------------------------------------------------ generation
    def _generate_batch(self, reqs: list[Request], max_new: int, offset: int) -> Output:
        """Segmented generation of ``reqs`` (module doc); rows advance independently, batched per round."""
        from rcd.engine.vllm_plugin import CAPTURE

        t_start = time.perf_counter()
        search_s0 = CAPTURE.search_s  # kNN searches inside vLLM during this batch
        n_prov = len(self.provenance)
        sched, c = self.schedule, self.control
        rows = []
        for r in reqs:
            s = None
            if sched is not None and c is not None and not c.retrieves_itself:
                s = copy.copy(sched)  # per-row decisions; counts are added back to the engine's schedule below
                s.asked = s.fired = 0
                s.reset(1, device=torch.device("cpu"))
            rows.append(_Row(self, r, max_new, s, offset + len(rows)))
        cost = self.new_cost()
        cost["segments"] = 0
        ttft = None
        active = list(range(len(rows)))
        while active:
            # rows whose schedule reads no probabilities decide the step before their segment
            for i in active:
                row = rows[i]
                if row.schedule is not None and not row.schedule.needs_probs and not row.decided:
                    self._decide(row, None)
            prompts, params = [], []
            for i in active:
                row = rows[i]
                n = self._segment_len(row, max_new)
                prompts.append(row.seqs([0])[0])
                want_lp = self.trace is not None or (row.schedule is not None and row.schedule.needs_probs)
                params.append(self._params(n, logprobs=want_lp,
                                           seed=self.seed + offset + i + 31 * row.step, extra=self._extra(row)))
            outs = self._submit(prompts, params, cost)
            cost["segments"] += len(prompts)
            if ttft is None:
                firsts = [float(o.metrics.first_token_latency) for o in outs  # vLLM's own per-request counter
                          if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", 0)]
                ttft = (time.perf_counter() - t_start - (cost["model_s"] - min(firsts))) if firsts \
                    else time.perf_counter() - t_start  # rcd's time before the call + vLLM's first-token latency
            still = []
            for i, o in zip(active, outs):
                row = rows[i]
                self._take_segment(row, o.outputs[0])
                g = row.gen[0]
                if not ((self.stop_at_eos and g and g[-1] in self.eos_ids) or len(g) >= max_new):
                    still.append(i)
            active = still
        for row in rows:
            for key in ("retrievals", "retrieval_s"):
                cost[key] += row.cost[key]
            if row.schedule is not None and sched is not None:
                sched.asked += row.schedule.asked
                sched.fired += row.schedule.fired
        cost["steps"] = sum(len(r.gen[0]) for r in rows)  # one step (one schedule decision) per token
        if c is not None and c.retrieves_itself:
            for r in rows:
                r.fired[0] = len(r.gen[0])
            cost["retrievals"] = cost["steps"]
            cost["retrieval_s"] = CAPTURE.search_s - search_s0
        cost["tokens"] = sum(len(r.gen[0]) for r in rows)
        cost["ttft"] = ttft
        cost["reused_tokens"] = cost.get("cached_tokens", 0)
        cost["wall_s"] = time.perf_counter() - t_start
        texts = [self.decode([t for t in r.gen[0] if t not in self.eos_ids]) for r in rows]
        return Output(texts=texts, token_ids=[list(r.gen[0]) for r in rows], cost=cost,
                      provenance=self.provenance[n_prov:], retrieved=[r.retrieved[0] for r in rows],
                      fired=[r.fired[0] for r in rows])

    def _segment_len(self, row: _Row, max_new: int) -> int:
        left = max_new - row.step
        s = row.schedule
        if s is None:
            return left
        quiet = s.quiet_steps(row.step) if hasattr(s, "quiet_steps") else None
        n = self.settings.segment_tokens if quiet is None else quiet + 1
        return max(1, min(left, n))

    def _decide(self, row: _Row, probs: Optional[torch.Tensor]) -> bool:
        """Ask the row's schedule at its current step; on firing the control takes the evidence."""
        t = row.step
        row.step_no = t
        last = torch.tensor([row.gen[0][-1]]) if t > 0 else None
        fire = bool(row.schedule.should_fire(t, probs, last)[0])
        row.decided = True
        if fire:
            n0 = len(self.provenance)
            self.control.on_fire(row, [0])
            if hasattr(self.control, "vllm_evidence"):  # snapshot now: the control's state is per call, not per row
                row.evidence = self.control.vllm_evidence(row, 0)
            for rec in self.provenance[n0:]:
                rec["row"] = row.index
        return fire

    def _take_segment(self, row: _Row, comp) -> None:
        """Append the segment's tokens up to the first step whose schedule fires (asked in order)."""
        toks = list(comp.token_ids)
        lps = comp.logprobs
        s = row.schedule
        for j, tok in enumerate(toks):
            if s is not None and not row.decided:
                probs = None
                if s.needs_probs:
                    top = max(lps[j].values(), key=lambda lp: lp.logprob)
                    probs = torch.tensor([[math.exp(top.logprob)]], dtype=torch.float32)
                if self._decide(row, probs):
                    return  # the segment is cut here: the row continues from the new prompt
            row.decided = False
            if self.trace is not None:  # {row, step, token, logprob}: vLLM's log p of each chosen token
                self.trace.append({"row": row.index, "step": row.step, "token": int(tok),
                                   "logprob": float(lps[j][tok].logprob),
                                   "top_logprob": max(float(v.logprob) for v in lps[j].values())})
            row.gen[0].append(int(tok))

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor, *, window: int = 512, stride: int = 256) -> PerplexityResult:
        """Per-token NLL of ``token_ids`` from vLLM's prompt log-probabilities (plain), and under kNN-LM with the
        query states vLLM's logits layer saw, mixed by rcd's functions."""
        from rcd.control.knn import knn_target_probs
        from rcd.engine.vllm_plugin import CAPTURE

        ids = token_ids.view(-1).cpu().tolist()
        n = len(ids)
        if n < 2:
            raise EngineError("engine=vllm: a text to score needs at least 2 tokens")
        limit = self.settings.max_model_len or self.lm.context_length or 2048
        if window > limit:
            raise EngineError(f"task.window={window} exceeds engine=vllm's max_model_len={limit}")
        wins = windows(n, window, stride)
        cost = self.new_cost()
        t0 = time.perf_counter()
        nll_none = np.zeros(n - 1, dtype=np.float64)
        nll = np.zeros(n - 1, dtype=np.float64) if self.control is not None else None
        c = self.control
        extra = self._extra()
        if c is not None and extra is None:
            raise EngineError(f"engine=vllm scores a text plainly or under kNN-LM; control {type(c).__name__} "
                              "scores on engine=hf")
        if c is None:
            outs = self._submit([ids[b:e] for b, e, _ in wins],
                                [self._params(1, logprobs=False, prompt_logprobs=0) for _ in wins], cost)
            for (b, e, first), o in zip(wins, outs):
                self._fill(nll_none, o, b, e, first, ids)
            seconds_none = time.perf_counter() - t0
        else:
            seconds_none = 0.0
            for b, e, first in wins:
                CAPTURE.record()
                try:
                    (o,) = self._submit([ids[b:e]], [self._params(1, logprobs=False, prompt_logprobs=0)], cost)
                finally:
                    calls = CAPTURE.stop()
                self._fill(nll_none, o, b, e, first, ids)
                hid = [h for h in calls if h.shape[0] == e - b - 1]
                if not hid:
                    raise EngineError(f"engine=vllm: no hidden states of the {e - b - 1} prompt positions came back "
                                      f"from vLLM's logits layer (calls of {[h.shape[0] for h in calls]} rows)")
                h = hid[-1][first - b:e - 1 - b]
                tg = torch.tensor(ids[first + 1:e])
                ts = time.perf_counter()
                nb = c.datastore.search(h, int(extra["rcd_knn"]["k"]))
                pk = knn_target_probs(nb.scores, nb.tokens, tg, float(extra["rcd_knn"]["temperature"]), nb.metric)
                cost["retrieval_s"] += time.perf_counter() - ts
                lam = float(extra["rcd_knn"]["lmbda"])
                lp_lm = torch.from_numpy(-nll_none[first:e - 1])
                mix = torch.logaddexp(lp_lm + math.log1p(-lam), pk.double().clamp_min(0).log() + math.log(lam)) \
                    if lam > 0 else lp_lm
                nll[first:e - 1] = -mix.numpy()
            cost["retrievals"] = n - 1
        cost["steps"] = cost["tokens"] = n - 1
        cost["wall_s"] = time.perf_counter() - t0
        n_bytes = len(self.tok.decode(ids[1:]).encode("utf-8"))
        fired = n - 1 if c is not None else 0
        if c is not None:  # the plain log-probabilities come from the same vLLM calls: their time is vLLM's
            seconds_none = cost["model_s"]
        return PerplexityResult(nll_none=nll_none, nll=nll, n_bytes=n_bytes, seconds_none=seconds_none,
                                seconds=cost["wall_s"], fired=fired,
                                extra={"cost": self.finish_cost(cost), "engine": "vllm"} if c is not None else {})

    @staticmethod
    def _fill(nll: np.ndarray, out, b: int, e: int, first: int, ids: Sequence[int]) -> None:
        plp = out.prompt_logprobs
        for p in range(first, e - 1):
            entry = plp[p - b + 1]
            nll[p] = -float(entry[ids[p + 1]].logprob)
