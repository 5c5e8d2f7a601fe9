"""Loss/throughput accounting between log lines, without a host sync per step."""

from __future__ import annotations

import time
from typing import Optional

import torch
from accelerate import Accelerator


class Meter:
    """Sums losses on the device between log lines (no host sync per step) and times training."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0  # training time in this log window (eval and saving excluded)
        self.loss: Optional[torch.Tensor] = None
        self.parts: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0

    def add(self, loss: Optional[torch.Tensor], parts: dict[str, torch.Tensor], tokens: int) -> None:
        self.tokens += tokens
        if loss is None:
            return
        self.loss = loss if self.loss is None else self.loss + loss
        for name, value in parts.items():
            self.parts[name] = self.parts.get(name, 0) + value
        self.steps += 1

    def reduce(self, accelerator: Accelerator) -> None:
        """Sum the per-process losses (each already scaled by the global item count) and token counts."""
        device = accelerator.device
        values = [self.loss if self.loss is not None else torch.zeros((), device=device)]
        names = sorted(self.parts)
        values += [torch.as_tensor(self.parts[n], device=device, dtype=torch.float32) for n in names]
        values.append(torch.tensor(float(self.tokens), device=device))
        summed = accelerator.reduce(torch.stack([v.float().reshape(()) for v in values]), reduction="sum")
        if self.loss is not None:
            self.loss = summed[0]
        for index, name in enumerate(names):
            self.parts[name] = summed[1 + index]
        self.tokens = int(summed[-1].item())

    def means(self) -> dict[str, float]:
        if not self.steps or self.loss is None:
            return {}
        out = {"loss": float(self.loss) / self.steps}
        out.update({f"loss_{k}": float(v) / self.steps for k, v in self.parts.items()})
        return out

    def lap(self) -> float:
        """Seconds since the last lap/restart."""
        now = time.perf_counter()
        elapsed, self.started = now - self.started, now
        self.seconds += elapsed
        return elapsed

    def restart(self) -> None:
        self.started = time.perf_counter()
