"""`engine.ema`: an exponential moving average of the trainable weights (diffusers' EMAModel), swapped in for
evaluation, samples and every saved model, and kept in checkpoints so a resumed run continues the same average."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


class WeightAverage:
    """The EMA of a model's trainable parameters; `applied()` puts it in the model for a while."""

    def __init__(self, model: torch.nn.Module, decay: float):
        """(Whole weights only: recipe validation refuses engine.ema with a sharded strategy.)"""
        from diffusers.training_utils import EMAModel

        # warm-up as diffusers' train_unconditional.py: decay 1 - (1 + step)^-3/4, capped at `decay`
        self.device = next(model.parameters()).device
        self.average = EMAModel(self._params(model), decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)

    @staticmethod
    def _params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def update(self, model: torch.nn.Module) -> None:
        """One averaging step, after an optimizer step."""
        self.average.step(self._params(model))

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The averaged weights in `model` inside the block; the trained ones back after it."""
        params = self._params(model)
        self.average.store(params)
        self.average.copy_to(params)
        try:
            yield
        finally:
            self.average.restore(params)

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)
        self.average.to(device=self.device)  # checkpoints load onto the CPU
