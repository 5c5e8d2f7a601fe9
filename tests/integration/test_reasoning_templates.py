"""Reasoning templates that rewrite history (Qwen3 drops earlier `<think>` blocks; DeepSeek-R1's generation prompt
opens `<think>` and its history keeps only answers): multi-turn conversations with reasoning train per turn, and
plain transformers (`apply_chat_template(history, add_generation_prompt=True)` + greedy `generate`) on the saved
model reproduces `sft eval`'s predictions token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from tests.conftest import read_jsonl, write_jsonl, write_recipe
from tests.integration.test_chat_template_corpus import SOURCES, model_for

pytestmark = pytest.mark.integration
TOPICS = ["lists", "tuples", "dicts", "sets", "strings", "bytes", "files", "loops", "classes", "modules"]


def reasoning_rows(style: str, count: int, offset: int) -> list[dict]:
    """Two-reply conversations whose replies reason first: as `reasoning_content` (Qwen3) or as a `<think>` block
    at the start of the content (DeepSeek-R1)."""
    rows = []
    for n in range(offset, offset + count):
        first, second = TOPICS[n % len(TOPICS)], TOPICS[(n * 3 + 1) % len(TOPICS)]
        messages = []
        for topic, question in ((first, "What are"), (second, "And")):
            thought, answer = f"The user asks about {topic}.", f"{topic.capitalize()} are a Python type."
            messages.append({"role": "user", "content": f"{question} {topic}?"})
            if style == "qwen3":
                messages.append({"role": "assistant", "content": answer, "reasoning_content": thought})
            else:
                messages.append({"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{answer}"})
        rows.append({"messages": messages})
    return rows


@pytest.mark.parametrize(("template", "style"), [("qwen3", "qwen3"), ("deepseek-r1-distill-llama-8b", "r1")])
def test_reasoning_conversations_train_per_turn_and_transformers_reproduces_eval(
    template, style, tmp_path, long_decoder, tiny_decoder
):
    model = model_for(SOURCES[template], long_decoder, tiny_decoder, tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", reasoning_rows(style, 48, 0))
    test = write_jsonl(tmp_path / "test.jsonl", reasoning_rows(style, 6, 100))
    values = {
        "name": template,
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "eval": str(test), "max_length": 256},
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"max_steps": 120, "epochs": 20, "batch_size": 8, "warmup": 0.0, "log_every": 10},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "eval": {"max_new_tokens": 64, "batch_size": 3},
        "output": {"dir": str(tmp_path / "run")},
    }
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", values))
    summary = commands.train(recipe, "finetune")
    # Both templates rewrite the history, so every reply is its own example after its own generation prompt.
    assert summary["chat_history"]["examples"] == {"per-turn": 96}
    metrics = commands.evaluate_model(recipe)
    assert metrics["loss"] < 3.0  # it learned the replies (a random model is near ln(vocab) ~ 6.5)
    predictions = read_jsonl(tmp_path / "run" / "predictions.jsonl")

    saved = tmp_path / "run" / "model"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    for row in predictions:
        ids = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        with torch.no_grad():
            out = reloaded.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :].tolist()
        eos = reloaded.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos])
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        assert tokenizer.decode(out[:cut], skip_special_tokens=True).strip() == row["prediction"]
        assert row["stopped"] == (cut < len(out))
    assert any(row["stopped"] for row in predictions)  # replies end: the end-of-turn marker was learned


@pytest.mark.parametrize(
    ("template", "history", "examples", "because", "stop"),
    [
        ("qwen3", "auto", {"per-turn": 12}, "rewrites history", "<|im_end|>"),
        ("qwen3", "per-turn", {"per-turn": 12}, None, "<|im_end|>"),
        ("llama-3-8b-instruct", "auto", {"whole": 6}, None, "<|eot_id|>"),
        ("glm-4.5", "auto", {"per-turn": 12}, "no end-of-turn marker", "appended"),
    ],
)
def test_plan_says_how_history_is_laid_out_and_why(
    template, history, examples, because, stop, tmp_path, long_decoder, tiny_decoder
):
    from sft_cli.commands.plan import plan

    model = model_for(SOURCES[template], long_decoder, tiny_decoder, tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", reasoning_rows("qwen3", 6, 0))
    values = {
        "name": template,
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "max_length": 1024, "history": history},
        "schedule": {"batch_size": 2},
        "engine": {"device": "cpu", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    info = plan(load_recipe(write_recipe(tmp_path / "recipe.yaml", values)))["chat_history"]
    assert info["examples"] == examples
    assert (because in info["per_turn_because"]) if because else "per_turn_because" not in info
    assert stop in info["end_of_turn"]


def test_whole_refuses_a_history_rewriting_template_and_names_the_fix(tmp_path, long_decoder, tiny_decoder):
    from sft_cli.errors import SftError

    model = model_for(SOURCES["qwen3"], long_decoder, tiny_decoder, tmp_path / "base")
    train = write_jsonl(tmp_path / "train.jsonl", reasoning_rows("qwen3", 4, 0))
    values = {
        "name": "whole",
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "max_length": 1024, "history": "whole"},
        "schedule": {"max_steps": 1, "batch_size": 2},
        "engine": {"device": "cpu", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(SftError, match=r"row 1: turn 2: .*rewrites history.*set data.history: per-turn"):
        commands.train(load_recipe(write_recipe(tmp_path / "recipe.yaml", values)), "finetune")
