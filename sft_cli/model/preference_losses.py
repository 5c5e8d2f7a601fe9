"""Preference losses on per-pair completion log-probabilities: DPO, IPO, ORPO and SimPO. Pure functions.

Inputs are, per pair, the summed log-probability of the chosen and of the rejected completion under the policy
(`*_logps`), their completion token counts (`*_tokens`), and for DPO / IPO the same sums under the reference
model. Each function returns the per-pair losses and the implicit rewards (chosen, rejected) that eval reports;
the formulas are the papers', as TRL's DPOTrainer (`sigmoid`, with cDPO's label smoothing as TRL 0.x had it;
`ipo`), ORPOTrainer and CPOTrainer (`simpo`) write them, so runs compare with TRL's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from sft_cli.config.schema import PREFERENCE_LOSSES as LOSSES

NEEDS_REFERENCE = ("dpo", "ipo")


@dataclass
class PairLogps:
    """One batch of pairs: summed completion log-probabilities and completion lengths (tokens)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def mean_per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalized log-probabilities (IPO, ORPO, SimPO)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def dpo(
    policy: PairLogps, reference: PairLogps, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023), conservative with `label_smoothing` (cDPO): -log σ(β·Δ) on the log-ratio margin
    Δ = (π_c - ref_c) - (π_r - ref_r). Returns (losses, chosen rewards β(π_c - ref_c), rejected rewards)."""
    chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo(policy: PairLogps, reference: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023): (Δ - 1/(2β))² on the margin of length-normalized log-ratios (as TRL's `ipo`)."""
    policy_chosen, policy_rejected = policy.mean_per_token()
    reference_chosen, reference_rejected = reference.mean_per_token()
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    losses = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo(policy: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024): -β·log σ(log odds(c) - log odds(r)) on mean token log-probs,
    odds(p) = p / (1 - p); the NLL on the chosen completion is added by the caller (`loss.sft_weight`).
    Returns (losses, β·mean logp chosen, β·mean logp rejected) — ORPO's rewards."""
    chosen, rejected = (side.clamp(max=-1e-6) for side in policy.mean_per_token())  # p < 1: finite odds
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def simpo(
    policy: PairLogps, beta: float, gamma: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): -log σ(β·(mean logp_c - mean logp_r) - γ), no reference model.
    Returns (losses, β·mean logp chosen, β·mean logp rejected)."""
    chosen, rejected = policy.mean_per_token()
    logits = beta * (chosen - rejected) - gamma
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses, beta * chosen.detach(), beta * rejected.detach()


def preference_loss(
    kind: str,
    policy: PairLogps,
    reference: Optional[PairLogps],
    beta: float,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The named loss per pair, with its chosen and rejected rewards."""
    if kind in NEEDS_REFERENCE and reference is None:
        raise ValueError(f"{kind} needs the reference model's log-probabilities")
    if kind == "dpo":
        return dpo(policy, reference, beta, label_smoothing)  # type: ignore[arg-type]
    if kind == "ipo":
        return ipo(policy, reference, beta)  # type: ignore[arg-type]
    if kind == "orpo":
        return orpo(policy, beta)
    if kind == "simpo":
        return simpo(policy, beta, gamma, label_smoothing)
    raise ValueError(f"unknown preference loss {kind!r} (one of {', '.join(LOSSES)})")
