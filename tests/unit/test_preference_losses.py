"""The preference losses against their formulas, computed by hand (math, not torch) on small log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from sft_cli.model.preference_losses import PairLogps, preference_loss


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


POLICY = PairLogps(torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -7.0]), torch.tensor([4, 3]), torch.tensor([3, 7]))
REFERENCE = PairLogps(
    torch.tensor([-5.0, -8.0]), torch.tensor([-5.5, -7.5]), torch.tensor([4, 3]), torch.tensor([3, 7])
)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_is_minus_log_sigmoid_of_the_scaled_log_ratio_margin(smoothing):
    beta = 0.1
    losses, chosen, rejected = preference_loss("dpo", POLICY, REFERENCE, beta, label_smoothing=smoothing)
    for i, (pc, pr, rc, rr) in enumerate([(-4, -6, -5, -5.5), (-9, -7, -8, -7.5)]):
        margin = beta * ((pc - rc) - (pr - rr))
        expected = -log_sigmoid(margin) * (1 - smoothing) - log_sigmoid(-margin) * smoothing
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (pc - rc)) and rejected[i].item() == pytest.approx(
            beta * (pr - rr)
        )


def test_ipo_is_the_squared_distance_of_the_length_normalized_margin_from_half_over_beta():
    beta = 0.5
    losses, _, _ = preference_loss("ipo", POLICY, REFERENCE, beta)
    margin = (-4 / 4 - -5 / 4) - (-6 / 3 - -5.5 / 3)
    assert losses[0].item() == pytest.approx((margin - 1 / (2 * beta)) ** 2, rel=1e-6)


def test_orpo_is_minus_beta_log_sigmoid_of_the_log_odds_ratio():
    beta = 0.25
    losses, chosen, _ = preference_loss("orpo", POLICY, None, beta)
    c, r = -4 / 4, -6 / 3

    def log_odds(p: float) -> float:
        return p - math.log1p(-math.exp(p))

    assert losses[0].item() == pytest.approx(-beta * log_sigmoid(log_odds(c) - log_odds(r)), rel=1e-6)
    assert chosen[0].item() == pytest.approx(beta * c)


def test_simpo_has_a_margin_and_no_reference():
    beta, gamma = 2.0, 0.5
    losses, _, _ = preference_loss("simpo", POLICY, None, beta, gamma=gamma)
    c, r = -9 / 3, -7 / 7
    assert losses[1].item() == pytest.approx(-log_sigmoid(beta * (c - r) - gamma), rel=1e-6)
    more_margin, _, _ = preference_loss("simpo", POLICY, None, beta, gamma=gamma + 1)
    assert (more_margin > losses).all()  # the margin asks for more


def test_beta_reaches_the_loss_and_the_reference_is_required_where_used():
    low, _, _ = preference_loss("dpo", POLICY, REFERENCE, 0.1)
    high, _, _ = preference_loss("dpo", POLICY, REFERENCE, 1.0)
    assert not torch.allclose(low, high)
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss("dpo", POLICY, None, 0.1)


def test_chunked_token_logps_summed_per_sequence_equal_full_logits_in_value_and_gradient():
    from torch import nn

    from sft_cli.model.sequence_logps import per_sequence, token_logps

    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    sequence = torch.randint(0, 4, (37,))
    upstream = torch.randn(4)
    sums = per_sequence(token_logps(hidden, head, labels, rows=8), sequence, 4)
    (sums * upstream).sum().backward()
    chunked = [hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]
    hidden.grad = head.weight.grad = head.bias.grad = None
    per_token = head(hidden).log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
    full = torch.zeros(4).index_add(0, sequence, per_token)
    (full * upstream).sum().backward()
    assert torch.allclose(sums, full, atol=1e-5)
    for mine, reference in zip(chunked, [hidden.grad, head.weight.grad, head.bias.grad]):
        assert torch.allclose(mine, reference, atol=1e-5)


@pytest.mark.parametrize(
    ("row", "prompt", "chosen", "rejected"),
    [
        ({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."}, "Sky?", "Blue.", "Green."),
        (
            {
                "prompt": [{"role": "user", "content": "Sky?"}],
                "chosen": [{"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "assistant", "content": "Green."}],
            },
            "Sky?",
            "Blue.",
            "Green.",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}],
                "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}],
            },
            "Sky?",
            "Blue.",
            "Green.",
        ),
        ({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}, "Q: sky? A:", " blue", " green"),
    ],
)
def test_trl_pair_shapes_give_prompt_and_two_completions(row, prompt, chosen, rejected):
    from sft_cli.chat.preference_pairs import pair_messages

    prompt_messages, chosen_side, rejected_side = pair_messages(row, "prompt", "chosen", "rejected")
    assert prompt_messages[-1] == {"role": "user", "content": prompt}
    assert chosen_side == [{"role": "assistant", "content": chosen}]
    assert rejected_side == [{"role": "assistant", "content": rejected}]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Sky?", "chosen": "Blue.", "rejected": "Blue."}, "completions are identical"),
        (
            {
                "chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}],
            },
            "share no prompt",
        ),
        ({"prompt": "Sky?", "chosen": "Blue.", "rejected": None}, "'rejected' is empty"),
    ],
)
def test_bad_pairs_say_what_is_wrong(row, message):
    from sft_cli.chat.formats import InvalidConversation
    from sft_cli.chat.preference_pairs import pair_messages

    with pytest.raises(InvalidConversation, match=message):
        pair_messages(row, "prompt", "chosen", "rejected")


def test_scorer_at_explicit_positions_equals_full_logits_in_value_and_gradient(tiny_decoder):
    from transformers import AutoModelForCausalLM

    from sft_cli.model.sequence_logps import SequenceScorer

    torch.manual_seed(0)
    input_ids = torch.randint(5, 500, (2, 10))
    index = torch.tensor([3, 4, 9, 12, 13, 14])  # flat positions over [2 x 10]; targets need not follow them
    targets = torch.randint(5, 500, (6,))
    results = []
    for chunked in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_decoder)
        scorer = SequenceScorer(model, chunked)
        logps = scorer(input_ids, index, targets)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append(
            (logps.detach(), model.lm_head.weight.grad.clone(), model.model.embed_tokens.weight.grad.clone())
        )
    (ours, head_grad, embed_grad), (theirs, head_ref, embed_ref) = results
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(head_grad, head_ref, atol=1e-5) and torch.allclose(embed_grad, embed_ref, atol=1e-5)
