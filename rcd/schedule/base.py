"""Base of the "when" axis: a :class:`Schedule` decides, per decoding step, which rows retrieve.

One instance serves one decoding run, batched over ``B`` rows. The engine calls
:meth:`Schedule.should_fire` once per generated token, and the perplexity scorer
(:class:`rcd.engine.scoring.Scorer`) once per scored position, so generation and scoring retrieve
at the same steps by the same code. :meth:`Schedule.fire_mask` is the vectorised form over all
``T`` positions of a batch at once, for use outside rcd's loops (tests check it equals
``should_fire``).

Step convention
---------------
* step 0 predicts the first generated token; ``probs`` is the model's next-token
  distribution at that step *before* retrieval, ``last_tokens`` the token emitted at
  step-1 (``None`` at step 0).
* In :meth:`Schedule.fire_mask`, position ``t`` (predicting ``tokens[:, t+1]``) is step ``t``
  and the token emitted at step ``t-1`` is ``tokens[:, t]``; ``tokens[:, 0]`` is context only.
  So ``fire_mask(P, X)[:, t] == should_fire(t, P[:, t], X[:, t] if t > 0 else None)``.

Every call is counted: ``asked`` (rows asked) and ``fired`` (rows that fired) accumulate over
the instance's life (``reset`` starts a new batch and keeps them, so the rate covers a whole
evaluation; :meth:`Schedule.reset_stats` clears them). ``retrieval_rate = fired / asked``.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)


class Schedule(ABC):
    """Trigger asked once per step: should_fire(step, p_t, x_{t-1}) -> fire[B] (bool)."""

    #: whether :meth:`should_fire` / :meth:`fire_mask` read ``probs`` (engine skips softmax if not)
    needs_probs: bool = False
    #: whether :meth:`bind` must be called with a tokenizer before use
    needs_tokenizer: bool = False
    #: registry name (config-group file name)
    name: str = "schedule"
    #: what :meth:`should_fire` reads of ``probs``: ``"full"`` (the distribution) or ``"max"`` (only max_v p_v;
    #: an engine that knows only the top token's probability, vLLM, can then run the schedule)
    probs_read: str = "full"

    def __init__(self) -> None:
        self.fired = 0
        self.asked = 0
        self.batch_size: Optional[int] = None
        self.device = torch.device("cpu")

    #: the tokenizer :meth:`bind_tokenizer` bound last (None: none yet)
    bound_tokenizer: Any = None

    # ------------------------------------------------------------------ life cycle
    def bind(self, tokenizer: Any) -> "Schedule":
        """Precompute tokenizer-dependent tables (no-op by default). Returns ``self``. A schedule that reads
        tokens overrides this and sets ``needs_tokenizer = True``."""
        return self

    def bind_tokenizer(self, tokenizer: Any) -> "Schedule":
        """The public entry rcd calls (rcd.strategy, the engine): :meth:`bind` the model's tokenizer unless this
        one is bound already. Returns ``self``."""
        if self.bound_tokenizer is not tokenizer:
            self.bind(tokenizer)
            self.bound_tokenizer = tokenizer
        return self

    def reset(self, batch_size: int, device: Optional[torch.device | str] = None) -> None:
        """Start a new batch of ``batch_size`` rows (counters are kept, see module doc)."""
        if int(batch_size) < 1:
            raise ValueError(f"{type(self).__name__}.reset: batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        if device is not None:
            self.device = torch.device(device)

    def reset_stats(self) -> None:
        """Clear the ``fired`` / ``asked`` counters."""
        self.fired = 0
        self.asked = 0

    # ------------------------------------------------------------------ public API
    def should_fire(
        self,
        step: int,
        probs: Optional[torch.Tensor] = None,
        last_tokens: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Bool ``[B]``: rows that retrieve before predicting the token of ``step``."""
        step = int(step)
        if step < 0:
            raise ValueError(f"{type(self).__name__}.should_fire: step must be >= 0, got {step}")
        if probs is not None and probs.dim() != 2:
            raise ValueError(f"{type(self).__name__}.should_fire: probs must be [B, V], got {tuple(probs.shape)}")
        if last_tokens is not None and last_tokens.dim() != 1:
            raise ValueError(
                f"{type(self).__name__}.should_fire: last_tokens must be [B], got {tuple(last_tokens.shape)}"
            )
        batch, device = self._rows(probs, last_tokens)
        fire = self._decide(step, probs, last_tokens, batch, device).to(torch.bool)
        self._count(fire)
        return fire

    def fire_mask(
        self,
        probs: Optional[torch.Tensor],
        tokens: torch.Tensor,
        valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Bool ``[B, T]``: vectorised :meth:`should_fire` over all scoring positions.

        ``valid`` (bool ``[B, T]``, optional) marks real positions (not padding); invalid
        positions never fire and are not counted.
        """
        if tokens.dim() != 2:
            raise ValueError(f"{type(self).__name__}.fire_mask: tokens must be [B, T], got {tuple(tokens.shape)}")
        if probs is not None and (probs.dim() != 3 or tuple(probs.shape[:2]) != tuple(tokens.shape)):
            raise ValueError(
                f"{type(self).__name__}.fire_mask: probs must be [B, T, V] matching tokens {tuple(tokens.shape)}, "
                f"got {tuple(probs.shape)}"
            )
        if self.needs_probs and probs is None:
            raise ValueError(f"{type(self).__name__}.fire_mask needs probs (needs_probs=True)")
        mask = self._decide_all(probs, tokens).to(torch.bool)
        if valid is not None:
            mask = mask & valid.to(device=mask.device, dtype=torch.bool)
            self.asked += int(valid.sum())
            self.fired += int(mask.sum())
        else:
            self._count(mask)
        return mask

    @property
    def retrieval_rate(self) -> float:
        """fired / asked over everything asked so far (0.0 when nothing was asked)."""
        return self.fired / self.asked if self.asked else 0.0

    def params(self) -> dict[str, Any]:
        """Constructor parameters, for logs and result tables."""
        return {}

    def quiet_steps(self, step: int) -> Optional[int]:
        """A hint, never a decision: m such that steps ``step+1 .. step+m`` will not fire whatever the tokens,
        asked after the decision at ``step`` (None: unknown). vLLM asks for m + 1 tokens at once then
        (:mod:`rcd.engine.vllm_engine`); every step is still asked through :meth:`should_fire`."""
        return None

    def stats(self) -> dict[str, Any]:
        """``{"schedule", "asked", "fired", "retrieval_rate", **params}``."""
        return {
            "schedule": self.name,
            "asked": self.asked,
            "fired": self.fired,
            "retrieval_rate": self.retrieval_rate,
            **self.params(),
        }

    def log_stats(self, logger: Optional[logging.Logger] = None, rate: Optional[float] = None) -> dict[str, Any]:
        """Log the retrieval rate at INFO level and return :meth:`stats`. ``rate``: the run's retrieval rate as
        its task measured it (positions that retrieved / positions; a firing whose query is still too short
        retrieves later), which then is the one ``retrieval_rate`` reported; ``fired`` / ``asked`` stay the
        schedule's own decisions."""
        s = self.stats()
        if rate is not None:
            s["retrieval_rate"] = float(rate)
        (logger or log).info("schedule %s: retrieval rate %.4f (%d of %d decisions fired)", self.name,
                             s["retrieval_rate"], s["fired"], s["asked"])
        return s

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def _decide(
        self,
        step: int,
        probs: Optional[torch.Tensor],
        last_tokens: Optional[torch.Tensor],
        batch: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Bool ``[batch]`` for one step (inputs already validated)."""

    @abstractmethod
    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, T]`` for all positions (see module doc for the step convention)."""

    # ------------------------------------------------------------------ helpers
    def _rows(self, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor]) -> tuple[int, torch.device]:
        if probs is not None:
            return probs.shape[0], probs.device
        if last_tokens is not None:
            return last_tokens.shape[0], last_tokens.device
        if self.batch_size is None:
            raise RuntimeError(
                f"{type(self).__name__}: batch size unknown; call reset(batch_size) before should_fire "
                "when neither probs nor last_tokens is given"
            )
        return self.batch_size, self.device

    def _count(self, fire: torch.Tensor) -> None:
        self.asked += fire.numel()
        self.fired += int(fire.sum())

    @staticmethod
    def _full(batch: int, value: bool, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), value, dtype=torch.bool, device=device)
