"""``Adaptive``: retrieve when the model is unsure (FLARE / DRAGIN style active retrieval).

Confidence statistic per row of the next-token distribution ``p`` (before retrieval):

* ``mode="max_prob"``: c = max_v p_v; fire when c < θ (FLARE: a low-probability token is coming);
* ``mode="entropy"``: c = H(p) = -Σ_v p_v log p_v (nats); fire when c > θ (DRAGIN-like uncertainty).

``fire_at_start`` forces retrieval at step 0 whatever the confidence. :meth:`Adaptive.calibrate`
picks θ as a quantile of confidences from a development stream so that the firing rate hits a
target; :meth:`Adaptive.check_rate` warns about the known silent failure of adaptive triggers
(never or always firing).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Optional

import torch

from rcd.schedule.base import Schedule

MODES = ("max_prob", "entropy")


def _nextafter(x: torch.Tensor, direction: float) -> float:
    """The float32 neighbour of scalar ``x`` towards ``direction``."""
    return float(torch.nextafter(x.float().reshape(()), torch.tensor(direction, dtype=torch.float32)))


class Adaptive(Schedule):
    """fire_t = [c(p_t) < θ] (max_prob) or [c(p_t) > θ] (entropy); fire_0 = 1 if fire_at_start."""

    name = "adaptive"
    needs_probs = True

    def __init__(
        self,
        threshold: Optional[float] = 0.4,
        mode: str = "max_prob",
        fire_at_start: bool = True,
        target_rate: Optional[float] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Adaptive: mode must be one of {MODES}, got {mode!r}")
        if target_rate is not None and not 0.0 <= float(target_rate) <= 1.0:
            raise ValueError(f"Adaptive: target_rate must be in [0, 1], got {target_rate!r}")
        if threshold is None and target_rate is None:
            raise ValueError("Adaptive: give a threshold, or a target_rate and call calibrate() before decoding")
        self.mode = mode
        self.fire_at_start = bool(fire_at_start)
        self.target_rate = None if target_rate is None else float(target_rate)
        self.threshold: Optional[float] = None
        self.calibrated = False  # with target_rate set, decisions wait for calibrate()
        if threshold is not None:
            self._set_threshold(float(threshold))

    @property
    def probs_read(self) -> str:
        """max_prob reads only max_v p_v; entropy reads the whole distribution."""
        return "max" if self.mode == "max_prob" else "full"

    def params(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "mode": self.mode,
            "fire_at_start": self.fire_at_start,
            "target_rate": self.target_rate,
        }

    def _set_threshold(self, threshold: float) -> None:
        if math.isnan(threshold):
            raise ValueError("Adaptive: threshold is NaN")
        if self.mode == "max_prob" and not 0.0 <= threshold <= 1.0 + 1e-6:
            raise ValueError(f"Adaptive(mode='max_prob'): threshold is a probability in [0, 1], got {threshold}")
        if self.mode == "entropy" and threshold < 0.0:
            raise ValueError(f"Adaptive(mode='entropy'): threshold is an entropy in nats (>= 0), got {threshold}")
        self.threshold = threshold

    # ------------------------------------------------------------------ statistic
    def confidence(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-row statistic over the last dim of ``probs``: max prob, or entropy in nats."""
        if self.mode == "max_prob":
            return probs.max(dim=-1).values
        return torch.special.entr(probs).sum(dim=-1)

    def fires_on(self, confidences: torch.Tensor) -> torch.Tensor:
        """Bool of ``confidences``' shape: the threshold test alone (no start rule)."""
        if self.threshold is None:
            raise RuntimeError("Adaptive: threshold unset; call calibrate(confidences, target_rate) first")
        c = confidences.float()
        if self.mode == "max_prob":
            return c < self.threshold
        return c > self.threshold

    # ------------------------------------------------------------------ calibration
    def calibrate(self, confidences: torch.Tensor, target_rate: Optional[float] = None) -> float:
        """Set θ so that a fraction ``target_rate`` of ``confidences`` fires; return θ.

        With n values sorted ascending (c_(1) ≤ … ≤ c_(n)) and k = round(rate·n):
        max_prob fires on c < θ, so θ = (c_(k) + c_(k+1)) / 2 (the k lowest fire);
        entropy fires on c > θ, so θ = (c_(n-k) + c_(n-k+1)) / 2 (the k highest fire).
        The rate is exact up to ties (θ is computed in float32, the precision :meth:`fires_on`
        compares in). ``target_rate`` defaults to the constructor's.
        """
        rate = self.target_rate if target_rate is None else float(target_rate)
        if rate is None:
            raise ValueError("Adaptive.calibrate: no target_rate given (argument or constructor)")
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Adaptive.calibrate: target_rate must be in [0, 1], got {rate}")
        # float32 throughout: θ is then exactly representable where fires_on compares in float32
        c = confidences.detach().reshape(-1).float().cpu()
        c = c[~torch.isnan(c)]
        if c.numel() == 0:
            raise ValueError("Adaptive.calibrate: no (non-NaN) confidences given")
        c, _ = torch.sort(c)
        n = c.numel()
        k = int(round(rate * n))
        if self.mode == "max_prob":
            if k == 0:
                theta = float(c[0])  # nothing is strictly below the minimum
            elif k == n:
                theta = _nextafter(c[-1], math.inf)  # everything is below
            else:
                theta = float((c[k - 1] + c[k]) / 2)
        else:
            if k == 0:
                theta = float(c[-1])  # nothing is strictly above the maximum
            elif k == n:
                theta = _nextafter(c[0], -math.inf)  # everything is above
            else:
                theta = float((c[n - k - 1] + c[n - k]) / 2)
        self.threshold = theta
        self.calibrated = True
        if target_rate is not None:
            self.target_rate = rate
        return theta

    # ------------------------------------------------------------------ health check
    def check_rate(self, min_asked: int = 20) -> bool:
        """Warn when the observed rate is 0 or 1 over ≥ ``min_asked`` steps; return False then."""
        if self.asked < min_asked:
            return True
        if self.fired == 0 or self.fired == self.asked:
            warnings.warn(
                f"Adaptive schedule (mode={self.mode}, threshold={self.threshold}) fired {self.fired} of "
                f"{self.asked} times (rate {self.retrieval_rate:.2f}): the trigger is degenerate; "
                "recalibrate the threshold (Adaptive.calibrate) or pick another schedule",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        return True

    def log_stats(self, logger: Optional[logging.Logger] = None, rate: Optional[float] = None) -> dict[str, Any]:
        """Log the rate (see :meth:`Schedule.log_stats`) and run :meth:`check_rate`."""
        stats = super().log_stats(logger, rate)
        self.check_rate()
        return stats

    # ------------------------------------------------------------------ decisions
    def _check_calibrated(self) -> None:
        if self.target_rate is not None and not self.calibrated:
            from rcd.errors import RcdError

            raise RcdError(f"strategy.schedule.target_rate={self.target_rate} is set but θ was not calibrated: task=lm "
                           "and task=qa calibrate it before evaluating (rcd.calibrate); elsewhere set "
                           "strategy.schedule.target_rate=null and a threshold, or call Adaptive.calibrate()")

    def _decide(self, step: int, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor],
                batch: int, device: torch.device) -> torch.Tensor:
        self._check_calibrated()
        if step == 0 and self.fire_at_start:
            return self._full(batch, True, device)
        if probs is None:
            raise ValueError(f"Adaptive.should_fire needs probs at step {step} (needs_probs=True)")
        return self.fires_on(self.confidence(probs))

    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        assert probs is not None  # checked by fire_mask
        self._check_calibrated()
        mask = self.fires_on(self.confidence(probs)).to(tokens.device)
        if self.fire_at_start:
            mask[:, 0] = True
        return mask
