"""rcd inside vLLM without a fork: a logits layer that hands out hidden states, and rcd's logits processors.

vLLM's logits processors see logits only. kNN-LM needs the query hidden state (the datastore key: the LM
head's input, a tokens datastore built with ``layer=final``), so :func:`register` (the
``vllm.general_plugins`` entry point, run by vLLM in every process it starts, and by
:mod:`rcd.engine.vllm_engine` before it starts an engine) replaces vLLM's ``LogitsProcessor`` layer, the
layer that maps the final (post-norm) hidden states to logits, with :class:`HiddenStatesLogitsLayer`
(``PluggableLayer.register_oot``). It computes the same logits and keeps the hidden states it was given in
:data:`CAPTURE`.

:class:`KnnMixture` is a vLLM v1 logits processor (``LLM(logits_processors=[...])``). For every request
whose ``SamplingParams.extra_args`` hold ``{"rcd_knn": {"store", "lmbda", "k", "temperature"}}`` it
returns, in place of that row's logits, the normalised log-probabilities

    log p = log((1-λ)·softmax(z) + λ·p_kNN),   p_kNN(y) = Σ_{i ∈ kNN(h), v_i = y} softmax_i(-d_i / T)

with h the row's captured hidden state: rcd's own :func:`rcd.control.knn.knn_log_probs` and
:func:`rcd.control.knn.interpolate`, so both engines mix by the same code. λ, k and T are per request.
Greedy picks argmax log p; with ``logprobs_mode=processed_logprobs`` vLLM reports log p. ``store`` names a
datastore :func:`register_store` put in this process (rcd runs vLLM's engine core in its own process), or a
datastore folder, opened on first use.
"""
from __future__ import annotations

import threading
from abc import abstractmethod
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

#: the key of rcd's kNN-LM arguments in ``SamplingParams.extra_args``
KNN_ARGS = "rcd_knn"

_STORES: dict[str, Any] = {}
_LOCK = threading.Lock()


@dataclass
class Capture:
    """Hidden states of vLLM's logits-layer calls in this process. ``last``: the rows of the latest call (the
    sampled positions, read by :class:`KnnMixture` in the same step); while ``recording``, every call's rows in
    order (``calls``), for prompt-logprob scoring. ``searches``/``search_s``: kNN searches made here."""

    last: Optional[torch.Tensor] = None
    recording: bool = False
    calls: list = field(default_factory=list)
    searches: int = 0
    search_s: float = 0.0

    def put(self, hidden: torch.Tensor) -> None:
        self.last = hidden
        if self.recording:
            self.calls.append(hidden.detach().float().cpu())

    def record(self) -> "Capture":
        self.calls = []
        self.recording = True
        return self

    def stop(self) -> list:
        self.recording = False
        calls, self.calls = self.calls, []
        return calls


CAPTURE = Capture()


def register_store(datastore) -> str:
    """Make ``datastore`` findable by :class:`KnnMixture` in this process; returns its key (its folder)."""
    key = str(getattr(datastore, "folder", None) or f"rcd-store-{id(datastore)}")
    with _LOCK:
        _STORES[key] = datastore
    return key


def store(key: str):
    """The datastore of ``key`` (:func:`register_store`), or the datastore folder ``key`` opened once."""
    with _LOCK:
        ds = _STORES.get(key)
        if ds is None:
            from rcd.datastore.registry import open_datastore

            ds = _STORES[key] = open_datastore(Path(key))
        return ds


_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: swap in :class:`HiddenStatesLogitsLayer` (idempotent)."""
    global _REGISTERED, HiddenStatesLogitsLayer
    if _REGISTERED:
        return
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    if "LogitsProcessor" in op_registry_oot:  # registered by this module in an earlier import
        HiddenStatesLogitsLayer = op_registry_oot["LogitsProcessor"]
        _REGISTERED = True
        return

    class _HiddenStatesLogitsLayer(LogitsProcessor):
        """vLLM's logits layer, keeping the hidden states it maps to logits in :data:`CAPTURE`."""

        def forward(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False):
            if not self.logits_as_input:
                CAPTURE.put(hidden_states)
            return super().forward(lm_head, hidden_states, embedding_bias, skip_gather)

    HiddenStatesLogitsLayer = PluggableLayer.register_oot(_HiddenStatesLogitsLayer, name="LogitsProcessor")
    _REGISTERED = True


HiddenStatesLogitsLayer = None  # the class, once register() ran


def _base():
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

    return V1LogitsProcessor


class _PerRequest(_base()):
    """A v1 logits processor with per-request state: ``rows`` maps a batch index to :meth:`row_state` of the
    request's ``extra_args[key]`` (requests without it are left alone), kept through vLLM's batch updates."""

    key = ""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, Any] = {}

    def row_state(self, args: dict, output_ids: list) -> Any:
        """What :meth:`apply` needs of one request (``output_ids``: vLLM's live list of its output tokens)."""
        return dict(args)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, _prompt, out in batch_update.added:
            args = (params.extra_args or {}).get(self.key) if params is not None else None
            if args is None:
                self.rows.pop(i, None)
            else:
                self.rows[i] = self.row_state(args, out)
        from vllm.v1.sample.logits_processor import MoveDirectionality

        for a, b, how in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if how == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb


class KnnMixture(_PerRequest):
    """Per request: log((1-λ)·p_LM + λ·p_kNN) from the captured hidden state (module doc)."""

    key = KNN_ARGS  # rows: batch index -> the request's rcd_knn arguments

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(KNN_ARGS)
        if args is None:
            return
        missing = {"store", "lmbda", "k", "temperature"} - set(args)
        if missing:
            raise ValueError(f"extra_args[{KNN_ARGS!r}] lacks {sorted(missing)}")
        if not 0.0 <= float(args["lmbda"]) < 1.0 or int(args["k"]) < 1 or float(args["temperature"]) <= 0:
            raise ValueError(f"extra_args[{KNN_ARGS!r}]: need 0 <= lmbda < 1, k >= 1, temperature > 0; got {args}")

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        from rcd.control.knn import interpolate, knn_log_probs

        hidden = CAPTURE.last
        if hidden is None or hidden.shape[0] != logits.shape[0]:
            raise RuntimeError(f"rcd kNN-LM in vLLM: the logits layer saw {None if hidden is None else hidden.shape[0]} "
                               f"rows, the sampler {logits.shape[0]} (speculative decoding is not supported)")
        groups: dict[tuple, list[int]] = {}
        for i, a in self.rows.items():
            if i < logits.shape[0]:
                groups.setdefault((a["store"], int(a["k"]), float(a["temperature"]), float(a["lmbda"])), []).append(i)
        for (key, k, temp, lmbda), rows in groups.items():
            t0 = time.perf_counter()
            ds = store(key)
            idx = torch.tensor(sorted(rows), device=logits.device)
            lm_lp = torch.log_softmax(logits[idx].float(), -1)
            nb = ds.search(hidden[idx].float().cpu(), k)
            knn_lp = knn_log_probs(nb.scores, nb.tokens, logits.shape[-1], temp, nb.metric).to(logits.device)
            logits[idx] = interpolate(lm_lp, knn_lp, lmbda).to(logits.dtype)
            CAPTURE.searches += len(rows)
            CAPTURE.search_s += time.perf_counter() - t0
        return logits


#: the keys of rcd's evidence-driven controls' arguments in ``SamplingParams.extra_args``
TAG_ARGS = "rcd_tags"
SPAN_ARGS = "rcd_span"


class _EvidenceProcessor(_PerRequest):
    """Per request: an rcd logits control rebuilt from the request's ``extra_args[key]`` (its evidence), and
    its own ``apply`` on the row's logits with the tokens generated since the evidence arrived (``since``,
    the tokens of earlier segments, + this request's output so far) as ``input_ids``."""

    @classmethod
    @abstractmethod
    def make(cls, args: dict):
        """The rcd control holding this request's evidence (TagBias, SpanFilter)."""

    def row_state(self, args: dict, output_ids: list) -> tuple:
        return self.make(args), list(args.get("since", ())), output_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for i, (control, since, out) in self.rows.items():
            if i >= logits.shape[0]:
                continue
            ids = torch.tensor([since + list(out)], dtype=torch.long)
            logits[i] = control.apply(logits[i:i + 1].float(), input_ids=ids)[0].to(logits.dtype)
        return logits


class TagBiasMixture(_EvidenceProcessor):
    """:class:`rcd.control.tag_bias.TagBias` inside vLLM: log p' = log_softmax(log p + β·(b + c)), b from the
    tags' first tokens, c from tags begun since the evidence arrived."""

    key = TAG_ARGS

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (sampling_params.extra_args or {}).get(TAG_ARGS)
        if args is not None and len(args.get("tags", ())) != len(args.get("weights", ())):
            raise ValueError(f"extra_args[{TAG_ARGS!r}]: as many weights as tags")

    @classmethod
    def make(cls, args: dict):
        from rcd.control.tag_bias import TagBias

        tb = TagBias(beta=float(args["beta"]), continuation=bool(args["continuation"]))
        tb.set_evidence([args["tags"]], [args["weights"]], start=0)
        return tb


class SpanFilterMask(_EvidenceProcessor):
    """:class:`rcd.control.span_filter.SpanFilter` inside vLLM: only continuations of the evidence's spans (and
    eos) keep probability mass, renormalised."""

    key = SPAN_ARGS

    @classmethod
    def make(cls, args: dict):
        from rcd.control.span_filter import SpanFilter

        sf = SpanFilter(eos_token_id=list(args["eos"]), allow_eos=bool(args["allow_eos"]))
        sf.set_evidence([args["seqs"]], start=0)
        return sf
