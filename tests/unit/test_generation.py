"""Generative SFT pieces: masked prompts, packing isolation, the metrics."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sft_cli.config.schema import Recipe
from sft_cli.data.packing import pack_best_fit, packed_attention, packing_efficiency
from sft_cli.tasks.classification import ClassificationTask
from sft_cli.tasks.generation import GenerationTask
from sft_cli.tasks.metrics import generation_metrics
from sft_cli.tasks.text import train_bpe_tokenizer
from tests.conftest import full_logits

TEXTS = ["return the sum of the values", "open a file for reading", "send data over the socket"] * 20


@pytest.fixture(scope="module")
def task():
    tokenizer = train_bpe_tokenizer(TEXTS, 300)
    recipe = Recipe()
    recipe.data.packing = True
    t = GenerationTask(recipe)
    t.tokenizer = tokenizer
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64)
    torch.manual_seed(0)
    t.model = AutoModelForCausalLM.from_config(config).eval()
    t.isolation = "mask"
    return t


def rows(task, pairs):
    out = []
    for prompt, response in pairs:
        p = task.tokenizer(prompt + " =>", add_special_tokens=False)["input_ids"]
        r = task.tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [task.tokenizer.eos_token_id]
        out.append({"input_ids": p + r, "trained": [0] * len(p) + [1] * len(r), "prompt_length": len(p)})
    return out


def test_prompt_tokens_carry_label_minus_100_and_eos_is_a_target(task):
    example = rows(task, [("open a file", "io")])[0]
    batch = task.collate([example], train=False)
    labels = batch["labels"][0]
    p = example["prompt_length"]
    # position t predicts token t+1: the prompt's targets are masked up to the last prompt position
    assert (labels[: p - 1] == -100).all()
    assert labels[p - 1 : len(example["input_ids"]) - 1].tolist() == example["input_ids"][p:]
    assert example["input_ids"][-1] == task.tokenizer.eos_token_id  # EOS is trained, so decoding stops


def test_prompt_weight_trains_the_prompt(task):
    example = rows(task, [("open a file", "io")])[0]
    task.recipe.loss.prompt = 0.5
    try:
        batch = task.collate([example], train=False)
    finally:
        task.recipe.loss.prompt = 0.0
    assert (batch["labels"][0, : example["prompt_length"] - 1] != -100).all()
    assert batch["label_weights"][0, 0] == 0.5


def test_packed_examples_cannot_see_each_other(task):
    examples = rows(task, [("open a file", "io"), ("return the sum", "math"), ("send data", "socket")])
    packed = {"input_ids": [e["input_ids"] for e in examples], "trained": [e["trained"] for e in examples]}
    batch = task.collate([packed], train=True)
    segments = batch["segment_ids"][0]
    mask = packed_attention(batch["segment_ids"], torch.float32)[0, 0]
    for q in range(len(segments)):
        for k in range(len(segments)):
            if segments[q] >= 0 and segments[k] >= 0 and segments[q] != segments[k]:
                assert mask[q, k] < -1e30
    # no label crosses an example boundary
    ends = [i for i in range(len(segments) - 1) if segments[i] != segments[i + 1]]
    assert all(batch["labels"][0, i] == -100 for i in ends)
    # and the packed forward equals running each example alone
    with torch.no_grad():
        packed_logits = full_logits(task, batch)[0]
        start = 0
        for e in examples:
            alone = task.model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            assert torch.allclose(packed_logits[start : start + len(e["input_ids"])], alone, atol=1e-4)
            start += len(e["input_ids"])


def pack_greedy(lengths: list[int], max_length: int) -> list[list[int]]:
    """In-order packing: consecutive examples share a row while they fit (the baseline BFD is measured against)."""
    rows: list[list[int]] = []
    used = max_length + 1
    for index, length in enumerate(lengths):
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


SKEWED = [120, 100, 90, 70, 40, 30, 30, 20, 12, 10, 8, 8, 6, 5, 4, 4, 3, 3, 2, 2] * 5  # a long tail of short ones


def test_best_fit_never_splits_an_example_and_beats_greedy_on_skewed_lengths():
    import random

    lengths = SKEWED[:]
    random.Random(0).shuffle(lengths)
    best, greedy = pack_best_fit(lengths, 128), pack_greedy(lengths, 128)
    for rows in (best, greedy):
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # each example exactly once
        assert all(sum(lengths[i] for i in row) <= 128 for row in rows)  # never over a row, never split
    assert packing_efficiency(lengths, best, 128) > packing_efficiency(lengths, greedy, 128) + 0.05
    assert len(best) < len(greedy)


def test_length_grouping_defaults_per_task():
    assert GenerationTask(Recipe()).groups_by_length(None) is False
    assert ClassificationTask(Recipe()).groups_by_length(None) is True
    assert GenerationTask(Recipe()).groups_by_length(True) is True


def test_generation_metrics_known_values():
    perfect = generation_metrics(["os.path", "math"], ["os.path", "math"])
    assert perfect["exact_match"] == 1.0 and perfect["rouge_l"] == 1.0 and perfect["bleu"] > 99
    half = generation_metrics(["os.path", "json"], ["os.path", "math"])
    assert half["exact_match"] == 0.5 and 0 < half["rouge_l"] < 1 and 0 < half["bleu"] < 100
