"""``EveryToken``: retrieve at every step (kNN-LM, Memorizing-Transformer attention)."""
from __future__ import annotations

from typing import Optional

import torch

from rcd.schedule.base import Schedule


class EveryToken(Schedule):
    """fire_t = 1 for all t."""

    name = "every_token"

    def quiet_steps(self, step: int) -> Optional[int]:
        return 0

    def _decide(self, step: int, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor],
                batch: int, device: torch.device) -> torch.Tensor:
        return self._full(batch, True, device)

    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
