"""Sliding-window perplexity, with and without a logits control, from one forward pass.

The text's tokens x_0..x_{n-1} are read in windows of ``window`` tokens advancing by ``stride``;
each window scores only the targets not scored before, so every target after the first window
sees at least ``window - stride`` tokens of context. For every scored position the plain model
gives log p_LM(x_{t+1} | x_≤t); the strategy's control turns the same scores into log p'(·)
through :meth:`LogitsControl.apply` — the code ``model.generate`` runs — and the schedule's
``fire_mask`` says at which positions retrieval fires.

    PPL = exp(mean_t NLL_t)       bits/byte = Σ_t NLL_t / (ln 2 · bytes of the scored text)
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from rcd.hooks import HiddenCapture


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


@torch.inference_mode()
def score(lm, token_ids: torch.Tensor, control=None, schedule=None, *, window: int = 512, stride: int = 256,
          capture_layer="final") -> PerplexityResult:
    """Per-token NLL of ``token_ids`` [n] under the plain model and under ``control`` (if given).

    Controls that need retrieved evidence in the prompt, the cache or the processor (context,
    REPLUG, tags, inject; see :mod:`rcd.engine`) are scored by their strategy's engine. Schedule
    steps are global positions of the text (position p is step p; its last token is x_p).
    """
    engine = getattr(control, "engine", None)
    if engine is not None and engine.kind != "logits":
        return engine.score(token_ids, window=window, stride=stride)
    model, dev = lm.model, lm.device
    ids = token_ids.to(dev).view(-1)
    n = ids.numel()
    if n < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens: nothing to score")
    nll_none, nll_ctl = [], []
    t_model = t_ctl = 0.0
    fired = 0
    capture = HiddenCapture(model, capture_layer) if control is not None else None
    if schedule is not None:
        schedule.reset(1, device=dev)
    if capture is not None:
        capture.attach()
    try:
        for begin, end, first in windows(n, window, stride):
            x = ids[begin:end].view(1, -1)
            t0 = time.perf_counter()
            logits = model(input_ids=x, use_cache=False).logits[0].float()  # [L, V]
            t_model += time.perf_counter() - t0
            rows = slice(first - begin, end - 1 - begin)
            targets = ids[first + 1:end]
            sc = logits[rows]
            lm_lp = torch.log_softmax(sc, dim=-1)
            nll_none.append(-lm_lp.gather(1, targets.view(-1, 1)).squeeze(1))
            if control is not None:
                t1 = time.perf_counter()
                hidden = capture.hidden[0][rows]
                fire = None
                if schedule is not None:
                    probs = torch.softmax(sc, -1) if schedule.needs_probs else None
                    fire = torch.stack([schedule.should_fire(p, None if probs is None else probs[p - first:p - first + 1],
                                                             ids[p].view(1) if p > 0 else None)[0]
                                        for p in range(first, end - 1)]).to(sc.device)
                    fire = None if bool(fire.all()) else fire
                lp = control.apply(sc, input_ids=None, hidden=hidden, fire=fire)
                fired += int(fire.sum()) if fire is not None else sc.shape[0]
                nll_ctl.append(-lp.gather(1, targets.view(-1, 1)).squeeze(1))
                t_ctl += time.perf_counter() - t1
    finally:
        if capture is not None:
            capture.detach()
    n_bytes = len(lm.tokenizer.decode(ids[1:].tolist()).encode("utf-8"))
    return PerplexityResult(
        nll_none=torch.cat(nll_none).cpu().numpy().astype(np.float64),
        nll=torch.cat(nll_ctl).cpu().numpy().astype(np.float64) if control is not None else None,
        n_bytes=n_bytes, seconds_none=t_model, seconds=t_model + t_ctl, fired=fired)
