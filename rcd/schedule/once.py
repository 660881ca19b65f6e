"""``Once``: retrieve before the first generated token only (classic RAG)."""
from __future__ import annotations

from typing import Optional

import torch

from rcd.schedule.base import Schedule


class Once(Schedule):
    """fire_t = [t = 0]."""

    name = "once"

    def quiet_steps(self, step: int) -> Optional[int]:
        return 1 << 30  # nothing fires after step 0

    def _decide(self, step: int, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor],
                batch: int, device: torch.device) -> torch.Tensor:
        return self._full(batch, step == 0, device)

    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        mask[:, 0] = True
        return mask
