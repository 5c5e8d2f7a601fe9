"""A three-source generation mixture (messages, alpaca, prompt/response with their own keys) and a streamed one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, read_jsonl, write_jsonl, write_recipe

pytestmark = pytest.mark.integration
CHAT = REPO / "data" / "stdlib-chat" / "train.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """The same kind of conversations in three shapes: `turns` messages, alpaca rows, question/answer pairs."""
    root = tmp_path_factory.mktemp("mixture")
    rows = read_jsonl(CHAT)[:240]
    write_jsonl(root / "chat.jsonl", [{"turns": r["messages"]} for r in rows[:80]])
    first = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows[80:]]
    write_jsonl(root / "alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in first[:80]])
    write_jsonl(root / "qa.jsonl", [{"question": q, "answer": a} for q, a in first[80:]])
    return root


SOURCES = [
    ("chat.jsonl", {"messages_field": "turns"}),
    ("alpaca.jsonl", {"format": "alpaca"}),
    ("qa.jsonl", {"prompt_field": "question", "response_field": "answer"}),
]


def values(root: Path, decoder: Path, name: str, train: object, **schedule: object) -> dict:
    return {
        "name": name,
        "task": "generation",
        "backbone": {"name": str(decoder)},
        "data": {"train": train, "chat_template": "chatml", "max_length": 192},
        "optim": {"lr": 3e-3},
        "schedule": {"epochs": 1, "batch_size": 8, "warmup": 0.0, "log_every": 1, **schedule},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(root / name)},
    }


def mixture(root: Path, weights: tuple[float, ...] = (0.5, 0.3, 0.2)) -> list[dict]:
    return [{"path": str(root / file), "weight": w, **keys} for (file, keys), w in zip(SOURCES, weights)]


def built(recipe: Path):
    from sft_cli.config.recipe import load_recipe
    from sft_cli.tasks.registry import build_task

    task = build_task(load_recipe(recipe))
    task.setup(train=True)
    return task


def test_each_source_is_read_with_its_own_keys_and_masked_as_it_would_be_alone(tmp_path, sources, tiny_decoder):
    task = built(write_recipe(tmp_path / "mix.yaml", values(tmp_path, tiny_decoder, "mix", mixture(sources))))
    offsets = task.mixture.offsets
    for number, (file, keys) in enumerate(SOURCES):
        alone = values(tmp_path, tiny_decoder, f"alone{number}", str(sources / file))
        alone["data"].update(keys)
        single = built(write_recipe(tmp_path / f"alone{number}.yaml", alone)).train_set
        mixed = task.train_set.select(range(offsets[number], offsets[number + 1]))
        assert mixed["input_ids"] == single["input_ids"] and mixed["trained"] == single["trained"]
    # an alpaca row and a question/answer row train on exactly their answer and the end of turn
    tokenizer = task.tokenizer
    for number, answer in (
        (1, read_jsonl(sources / "alpaca.jsonl")[0]["output"]),
        (2, read_jsonl(sources / "qa.jsonl")[0]["answer"]),
    ):
        row = task.train_set[int(offsets[number])]
        trained = [i for i, t in zip(row["input_ids"], row["trained"]) if t]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert "<|im_start|>user" in tokenizer.decode(row["input_ids"])


def test_weights_set_the_shares_of_an_epoch_and_plan_shows_them(tmp_path, sources, tiny_decoder):
    from sft_cli.commands import train as commands
    from sft_cli.commands.plan import plan
    from sft_cli.config.recipe import load_recipe

    recipe = write_recipe(tmp_path / "mix.yaml", values(tmp_path, tiny_decoder, "mix", mixture(sources)))
    info = plan(load_recipe(recipe))
    assert [row["share"] for row in info["mixture"]] == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    assert [row["rows"] for row in info["mixture"]] == [80, 80, 80]
    assert sum(row["tokens_per_epoch"] for row in info["mixture"]) > 0
    summary = commands.train(load_recipe(recipe), "finetune")
    examples = summary["examples_per_source"]
    total = sum(examples.values())
    assert total == 240 and summary["epochs"] == 1
    shares = [examples[f"data.train[{i}]"] / total for i in range(3)]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    tokens = summary["tokens_per_source"]
    assert sum(tokens.values()) == summary["train_tokens"]
    assert json.loads((tmp_path / "mix" / "summary.json").read_text())["tokens_per_source"] == tokens
    assert summary["tokenized_rows_by_rank"] == [240]
    # other weights sample the same tokenized sources: read back from the data cache, nothing tokenized again
    other = values(tmp_path, tiny_decoder, "other", mixture(sources, (0.2, 0.2, 0.6)), max_steps=2)
    again = commands.train(load_recipe(write_recipe(tmp_path / "other.yaml", other)), "finetune")
    assert again["tokenized_rows_by_rank"] == [0]
    assert [row["rows_per_epoch"] for row in again["mixture"]] == [48, 48, 144]


def test_kill_9_then_resume_draws_the_same_mixture(tmp_path, sources, tiny_decoder):
    from tests.integration.test_schedules_resume import whole_and_resumed_losses

    def recipe(name: str) -> Path:
        run = values(tmp_path, tiny_decoder, name, mixture(sources), epochs=2)
        run["output"].update({"save_every": 6, "keep": 2})
        return write_recipe(tmp_path / f"{name}.yaml", run)

    losses = whole_and_resumed_losses("finetune", recipe("whole"), recipe("killed"), 24)
    runs = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("whole", "killed")]
    assert len(losses[0]) == runs[0]["steps"] == 60 and losses[1] == pytest.approx(losses[0], abs=1e-6)
    assert runs[1]["tokens_per_source"] == runs[0]["tokens_per_source"]
    assert runs[1]["examples_per_source"] == runs[0]["examples_per_source"]


def test_a_streamed_mixture_resumes_at_its_exact_block_and_keeps_its_weights(tmp_path, tiny_decoder):
    from sft_cli.commands import train as commands

    lines = [line for line in (REPO / "data" / "python-docs" / "train.txt").read_text().splitlines() if line.strip()]
    write_jsonl(tmp_path / "a.jsonl", [{"body": line} for line in lines[:300]])
    (tmp_path / "b.txt").write_text("\n".join(lines[300:600]) + "\n")
    train = [
        {"path": str(tmp_path / "a.jsonl"), "weight": 3, "text_field": "body"},
        {"path": str(tmp_path / "b.txt"), "weight": 1},
    ]
    run = {
        "name": "stream",
        "task": "language-modeling",
        "backbone": {"name": str(tiny_decoder)},
        "data": {"train": train, "max_length": 32, "streaming": True, "shuffle_buffer": 16},
        "schedule": {"max_steps": 30, "batch_size": 8, "warmup": 0.0, "log_every": 10},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp_path / "stream")},
    }
    recipe = write_recipe(tmp_path / "stream.yaml", run)
    task = built(recipe)
    full = iter(task.train_stream(0, 1, 4, 0))
    batches = [next(full) for _ in range(7)]
    later = iter(task.train_stream(0, 1, 4, 4))  # resumed after 4 batches
    for expected in batches[4:]:
        got = next(later)
        assert got["lm_input_ids"].equal(expected["lm_input_ids"]) and got["mixture_source"].equal(
            expected["mixture_source"]
        )
    from sft_cli.config.recipe import load_recipe

    summary = commands.train(load_recipe(recipe), "pretrain")
    blocks = summary["examples_per_source"]
    assert sum(blocks.values()) == 240 and abs(blocks["data.train[0]"] / 240 - 0.75) < 0.12
    assert sum(summary["tokens_per_source"].values()) == 240 * 32
