"""``EveryN``: retrieve every ``n`` tokens (In-Context RALM with retrieval stride ``n``)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from rcd.schedule.base import Schedule


class EveryN(Schedule):
    """fire_t = [t mod n = 0], i.e. steps 0, n, 2n, ..."""

    name = "every_n"

    def __init__(self, n: int = 16) -> None:
        super().__init__()
        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ValueError(f"EveryN: n (the retrieval stride in tokens) must be an integer >= 1, got {n!r}")
        self.n = int(n)

    def params(self) -> dict[str, Any]:
        return {"n": self.n}

    def quiet_steps(self, step: int) -> Optional[int]:
        return self.n - 1 - step % self.n

    def _decide(self, step: int, probs: Optional[torch.Tensor], last_tokens: Optional[torch.Tensor],
                batch: int, device: torch.device) -> torch.Tensor:
        return self._full(batch, step % self.n == 0, device)

    def _decide_all(self, probs: Optional[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        return (steps % self.n == 0).unsqueeze(0).expand(tokens.shape[0], -1).clone()
