"""kNN-LM interpolation (Khandelwal et al., 2020), a "how = logits" control.

    p(y | x) = (1 - λ) · p_LM(y | x) + λ · p_kNN(y | x)
    p_kNN(y | x) = Σ_{i ∈ kNN(q), v_i = y} softmax_i(-d_i / T)

with q the query hidden state, d_i the (squared L2) distance to neighbour i, v_i its next token
and T a temperature. For ``metric=ip`` the neighbour weights are softmax(s_i / T) of the inner
products. Mixing is done in log space: log p = logaddexp(log(1-λ) + log p_LM, log λ + log p_kNN).

The query is the hidden state at the datastore's key layer (its manifest's ``layer``: ``final``,
the LM head's input, or a block index), captured by a forward hook the control owns: the engine
attaches it around its forwards; inside a user's own ``model.generate`` use
``with knn.attached(model): model.generate(..., logits_processor=[knn])``.

Note the temperature: squared L2 distances between SmolLM2's final hidden states are ~300, so
T = 1 puts all mass on the single nearest neighbour; T ≈ 100 spreads it over the k neighbours.
"""
from __future__ import annotations

import math
import time
from typing import Optional

import torch

from rcd.control.base import LogitsControl
from rcd.hooks import HiddenCapture, key_layer, resolve_layer


def knn_weights(scores: torch.Tensor, temperature: float, metric: str = "l2") -> torch.Tensor:
    """Neighbour weights [N, k]: softmax_i(-d_i / T) (``ip``: softmax_i(s_i / T)); non-finite scores
    (missing hits) get weight 0."""
    logits = -scores / temperature if metric == "l2" else scores / temperature
    return torch.nan_to_num(torch.softmax(logits.float(), dim=-1), nan=0.0)


def knn_log_probs(scores: torch.Tensor, tokens: torch.Tensor, vocab_size: int, temperature: float,
                  metric: str = "l2") -> torch.Tensor:
    """log p_kNN [N, V] from neighbour scores [N, k] (distances or similarities) and tokens [N, k]."""
    weights = knn_weights(scores, temperature, metric)
    probs = torch.zeros(scores.shape[0], vocab_size, dtype=torch.float32, device=scores.device)
    probs.scatter_add_(1, tokens.long(), weights)
    return probs.clamp_min(0).log()


def knn_target_probs(scores: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, temperature: float,
                     metric: str = "l2") -> torch.Tensor:
    """p_kNN(target) [N]: ``knn_log_probs(...).exp()`` at each row's ``targets`` token, without the
    [N, V] table."""
    weights = knn_weights(scores, temperature, metric)
    return (weights * (tokens.long() == targets.long().view(-1, 1)).float()).sum(1)


def interpolate(lm_log_probs: torch.Tensor, knn_lp: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log((1-λ)·p_LM + λ·p_kNN), row-wise, in log space."""
    if lmbda <= 0:
        return lm_log_probs
    if lmbda >= 1:
        return knn_lp
    return torch.logaddexp(lm_log_probs + math.log1p(-lmbda), knn_lp + math.log(lmbda))


class KNNInterpolation(LogitsControl):
    """p = (1-λ)·p_LM + λ·p_kNN over the k nearest token-datastore entries of the query state."""

    name = "knn"
    accepts_units = ("tokens",)
    retrieves_itself = True

    def __init__(self, k: int = 256, lmbda: float = 0.1, temperature: float = 100.0, datastore=None, capture=None):
        if k < 1:
            raise ValueError(f"knn k={k} must be >= 1")
        if not 0.0 <= lmbda < 1.0:
            raise ValueError(f"knn lmbda={lmbda} must be in [0, 1): with lmbda=1 every token outside the k "
                             "neighbours gets probability 0 (infinite perplexity); use e.g. 0.99")
        if temperature <= 0:
            raise ValueError(f"knn temperature={temperature} must be > 0")
        self.k, self.lmbda, self.temperature = int(k), float(lmbda), float(temperature)
        self.datastore = datastore
        self.capture = capture
        self.last_neighbours = None

    def bind(self, datastore=None, capture=None, **_) -> "KNNInterpolation":
        if datastore is not None:
            self.datastore = datastore
        if capture is not None:
            self.capture = capture
        return self

    # ------------------------------------------------------------------ engine protocol
    def prepare(self, lm, eos_ids) -> None:
        resolve_layer(lm.model, key_layer(self.datastore))  # a layer the model lacks fails at start-up

    # ------------------------------------------------------------------ inside vLLM (rcd.engine.vllm_engine)
    def vllm_args(self, engine, evidence=None, generated=()) -> dict:
        """A request's ``extra_args`` for vLLM's :class:`rcd.engine.vllm_plugin.KnnMixture` (λ, k, T per request)."""
        from rcd.engine.vllm_plugin import KNN_ARGS, register_store

        return {KNN_ARGS: {"store": register_store(self.datastore), "lmbda": self.lmbda, "k": self.k,
                           "temperature": self.temperature}}

    def vllm_refusal(self) -> Optional[str]:
        """vLLM hands out the LM head's input only: keys of another layer cannot be queried there."""
        layer = key_layer(self.datastore)
        if layer != "final":
            return (f"the datastore's keys come from layer {layer}; inside vLLM only the LM head's input is seen "
                    "(build the tokens datastore with datastore.layer=final)")
        return None

    def attach(self, model, run=None) -> "KNNInterpolation":
        """Capture the query states at the key layer during the next forwards."""
        self.detach()
        cap, layer = self.capture, key_layer(self.datastore)
        if not isinstance(cap, HiddenCapture) or cap.model is not model or cap.layer != layer:
            cap = HiddenCapture(model, layer)
        self.capture = cap.attach()
        self._attached = True
        return self

    def detach(self) -> None:
        if getattr(self, "_attached", False):
            self.capture.detach()
            self._attached = False

    def logprobs(self, run, logits: torch.Tensor, fire: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.apply(logits, input_ids=None, hidden=self.current_hidden(), fire=fire.to(logits.device))
        run.cost["retrieval_s"] += time.perf_counter() - t0
        nb = self.last_neighbours
        if nb is not None and bool(fire.any()):
            rows = [b for b in range(run.B) if bool(fire[b])]
            for j, b in enumerate(rows[: nb.ids.shape[0]]):
                run.record(b, ids=nb.ids[j, :8].tolist(), scores=nb.scores[j, :8].tolist(),
                           tokens=nb.tokens[j, :8].tolist())
            self.last_neighbours = None
        return out

    def score_window(self, scorer, win) -> torch.Tensor:
        """The kNN mixture at the window's firing positions, queried with the captured states."""
        hidden = self.capture.hidden[0][win.first - win.begin:win.end - 1 - win.begin]
        fire = torch.zeros(win.end - 1 - win.first, dtype=torch.bool)
        fire[[p - win.first for p in win.fires]] = True
        lp = self.apply(win.logits, input_ids=None, hidden=hidden,
                        fire=None if bool(fire.all()) else fire.to(win.logits.device))
        return -lp.gather(1, win.targets.view(-1, 1)).squeeze(1).double().cpu()

    def apply(self, scores: torch.Tensor, *, input_ids=None, hidden: Optional[torch.Tensor] = None,
              fire: Optional[torch.Tensor] = None, neighbours=None, **_) -> torch.Tensor:
        lm_lp = torch.log_softmax(scores.float(), dim=-1)
        if fire is not None and not bool(fire.any()):
            return lm_lp
        if neighbours is None:
            if hidden is None or self.datastore is None:
                raise RuntimeError("KNNInterpolation needs a token datastore and query hidden states "
                                   "(bind(datastore, capture) or pass hidden=)")
            rows = hidden if fire is None else hidden[fire.to(hidden.device)]
            neighbours = self.datastore.search(rows, self.k)
        self.last_neighbours = neighbours
        knn_lp = knn_log_probs(neighbours.scores, neighbours.tokens, scores.shape[-1], self.temperature,
                               neighbours.metric)
        if fire is None:
            return interpolate(lm_lp, knn_lp, self.lmbda)
        out = lm_lp.clone()
        f = fire.to(lm_lp.device)
        out[f] = interpolate(lm_lp[f], knn_lp, self.lmbda)
        return out
