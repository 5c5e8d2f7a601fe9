"""Real chat templates (tests/fixtures/chat_templates): each trains two steps of `sft finetune` on a tiny model
carrying that model's own special tokens, and an oracle written apart from the mask code checks every example.

The oracle knows nothing of sft's encoder. It gives every message a unique placeholder, renders the
conversation with transformers' `apply_chat_template` (as inference does), decodes the examples sft trained on,
and checks by character position that each trained span
- starts exactly where the template's generation prompt for that turn ends (the text before it is that prompt),
- is the reply as the template writes it when it is the newest turn (or, for a template that writes no
  end-of-turn marker, that whole rendering plus EOS),
- holds every placeholder of its own turn the template renders there and none of any other turn,
- ends with the template's end-of-turn marker and contains no earlier one;
and that every assistant turn of a trained row is trained exactly once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from tests.conftest import REPO, write_jsonl, write_recipe

pytestmark = pytest.mark.integration
CORPUS = REPO / "tests" / "fixtures" / "chat_templates"
SOURCES = {entry["name"]: entry for entry in json.loads((CORPUS / "sources.json").read_text(encoding="utf-8"))}
PLACEHOLDER = r"zq[a-z]\d{4}q"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up in the glossary.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]
# What closes a reply, where it is not the model's EOS (labelled by hand from each template).
END_OF_TURN = {
    "gemma-2": {"<end_of_turn>"},
    "gemma-3": {"<end_of_turn>"},
    "phi-3-mini-instruct": {"<|end|>"},
    "phi-3.5-mini-instruct": {"<|end|>"},
    "phi-4-mini-instruct": {"<|end|>"},
    "gpt-oss-120b": {"<|return|>", "<|end|>", "<|call|>"},
    "command-r": {"<|END_OF_TURN_TOKEN|>"},
    "command-r-plus-tool-use": {"<|END_OF_TURN_TOKEN|>"},
    "command-r7b-tool-use": {"<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>", "<|END_ACTION|>"},
    "codellama-70b-instruct": {"<step>"},
    "functionary-medium-v3.1": {"<|eot_id|>", "<|eom_id|>"},
    "internlm2-chat-7b": {"<|im_end|>"},
    "llama-3.1-8b-instruct": {"<|eot_id|>", "<|eom_id|>"},
}
# Markers that also close a message inside one reply (gpt-oss: the analysis message before the final one).
INSIDE_A_REPLY = {"gpt-oss-120b": {"<|end|>"}}
WORDS = ["lists", "tuples", "json", "csv files", "the os module", "pathlib", "regular expressions", "sqlite3"]


def mark(kind: str, row: int, turn: int) -> str:
    """A unique placeholder: kind (s system, u user, a assistant, r reasoning, c call argument, t tool result)."""
    return f"zq{kind}{row:02d}{turn:02d}q"


def conversations(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Varied conversations for one template: 1-3 replies, with and without a system turn, multi-line replies,
    reasoning where the template renders it, tool calls where it supports tools."""
    shapes = [
        ["user", "assistant"],
        ["system", "user", "assistant", "user", "assistant"],
        ["user", "assistant", "user", "assistant", "user", "assistant"],
        ["system", "user", "assistant"],
    ]
    rows = []
    for row in range(8):
        messages = []
        for turn, role in enumerate(shapes[row % 4]):
            word = WORDS[(row + turn) % len(WORDS)]
            text = {
                "system": f"You answer questions about Python. {mark('s', row, turn)}",
                "user": f"What are {word}? {mark('u', row, turn)}",
                "assistant": f"They are {word}. {mark('a', row, turn)}"
                + ("\nSee the library reference." if row % 3 == 1 else ""),
            }[role]
            messages.append({"role": role, "content": text})
        rows.append({"messages": messages})
    if entry["reasoning"]:
        for row in (8, 9):
            messages = [
                {"role": "user", "content": f"Why use {WORDS[row % 8]}? {mark('u', row, 0)}"},
                {
                    "role": "assistant",
                    "content": f"Because they help. {mark('a', row, 1)}",
                    "reasoning_content": f"Think about {mark('r', row, 1)} first.",
                    "thinking": f"Think about {mark('r', row, 1)} first.",
                },
                {"role": "user", "content": f"And {WORDS[(row + 1) % 8]}? {mark('u', row, 2)}"},
                {
                    "role": "assistant",
                    "content": f"They help too. {mark('a', row, 3)}",
                    "reasoning_content": f"Consider {mark('r', row, 3)} again.",
                    "thinking": f"Consider {mark('r', row, 3)} again.",
                },
            ]
            rows.append({"messages": messages})
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Is json text? {mark('u', 10, 0)}"},
                    {
                        "role": "assistant",
                        "content": f"<think>\nIt is {mark('r', 10, 1)}.\n</think>\n\nYes. {mark('a', 10, 1)}",
                    },
                ]
            }
        )
    if entry["supports_tools"]:
        for row, system in ((11, False), (12, True)):
            messages = [{"role": "system", "content": f"Use tools. {mark('s', row, 0)}"}] if system else []
            first = len(messages)
            messages += [
                {"role": "user", "content": f"Define {WORDS[row % 8]}. {mark('u', row, first)}"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call00001",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": {"query": mark("c", row, first + 1)}},
                        }
                    ],
                },
                {
                    "role": "tool",
                    "tool_call_id": "call00001",
                    "name": "lookup",
                    "content": f"A glossary entry. {mark('t', row, first + 2)}",
                },
                {"role": "assistant", "content": f"It is a glossary word. {mark('a', row, first + 3)}"},
            ]
            rows.append({"messages": messages, "tools": TOOLS})
    return rows


def model_for(entry: dict[str, Any], base: Path, tiny_decoder: Path, directory: Path) -> Path:
    """A model directory whose tokenizer carries the model's own BOS, EOS, special tokens and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder)
    tags = [t for t in entry["special_tokens"] if t.startswith("<") and t.strip("</>").replace("_", "").isalnum()]
    special = [t for t in [entry["bos_token"], entry["eos_token"], *entry["special_tokens"]] if t and t not in tags]
    tokenizer.add_tokens(list(dict.fromkeys(special)), special_tokens=True)
    tokenizer.add_tokens(tags)
    tokenizer.eos_token = entry["eos_token"]
    if entry["bos_token"]:
        tokenizer.bos_token = entry["bos_token"]
    tokenizer.chat_template = (CORPUS / f"{entry['name']}.jinja").read_text(encoding="utf-8")
    shutil.copytree(base, directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_template(name: str, tmp: Path, base: Path, tiny_decoder: Path, monkeypatch) -> dict[str, Any]:
    """Two steps of `sft finetune` with the template; returns the rows, the tokenizer and the examples trained."""
    from sft_cli.tasks.generation import GenerationTask

    entry = SOURCES[name]
    model = model_for(entry, base, tiny_decoder, tmp / "model")
    rows = conversations(entry)
    train = write_jsonl(tmp / "train.jsonl", rows)
    values = {
        "name": name,
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "max_length": 4096, "skip_invalid": True},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"max_steps": 2, "epochs": 2, "batch_size": 4, "warmup": 0.0, "log_every": 1},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp / "run")},
    }
    tasks = []
    setup = GenerationTask.setup

    def recording(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        tasks.append(self)

    monkeypatch.setattr(GenerationTask, "setup", recording)
    summary = commands.train(load_recipe(write_recipe(tmp / "recipe.yaml", values)), "finetune")
    (task,) = tasks
    return {"entry": entry, "rows": rows, "tokenizer": task.tokenizer, "examples": task.train_set, "summary": summary}


def render_as_transformers(tokenizer: Any, messages: list, tools: Any, prompt: bool) -> str:
    """`apply_chat_template` on the row, in the first spelling the template accepts (arguments as a dict or as
    JSON text, a tool call's null content as "", `tools=[]`): what a user would pass at inference."""
    import copy

    def spelled(arguments_as_text: bool, blank: bool) -> list:
        out = copy.deepcopy(messages)
        for message in out:
            if blank and message.get("content") is None:
                message["content"] = ""
            for call in message.get("tool_calls") or []:
                if arguments_as_text and isinstance(call["function"]["arguments"], dict):
                    call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
        return out

    first = None
    for given_tools in (tools, []) if tools is None else (tools,):
        for as_text, blank in ((False, False), (True, False), (False, True), (True, True)):
            try:
                return tokenizer.apply_chat_template(
                    spelled(as_text, blank), tools=given_tools, add_generation_prompt=prompt, tokenize=False
                )
            except Exception as err:  # noqa: BLE001 — the next spelling
                first = first or err
    raise first


def check_row(entry: dict, tokenizer: Any, row: dict, examples: list[tuple[list, list, str]]) -> None:
    """The oracle on one row's examples (see the module docstring)."""
    import re

    messages, tools = row["messages"], row.get("tools")
    eos = entry["eos_token"]
    ends = END_OF_TURN.get(entry["name"], {eos})

    def render(part: list, prompt: bool = False) -> str:
        return render_as_transformers(tokenizer, part, tools, prompt)

    spans = []  # (text, start, end) per trained run, in order
    for ids, trained, _ in examples:
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        runs, start = [], None
        for index, flag in enumerate([*trained, 0]):
            if flag and start is None:
                start = index
            elif not flag and start is not None:
                runs.append((start, index))
                start = None
        for a, b in runs:
            prefix = tokenizer.decode(ids[:a], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            upto = tokenizer.decode(ids[:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            assert text.startswith(upto), "decoding is not lossless for this tokenizer"
            spans.append((text, len(prefix), len(upto)))
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(spans) == len(replies), f"{len(spans)} trained spans for {len(replies)} replies"
    if examples[0][2] == "whole":
        assert len(examples) == 1 and spans[0][0] == render(messages)  # the conversation as inference renders it
    for index, (text, start, end) in zip(replies, spans):
        turn = f"turn {index + 1}"
        prompt, newest = render(messages[:index], True) if index else "", render(messages[: index + 1])
        trained = text[start:end]
        assert text[:start] == prompt, f"{turn}: the text before the trained span is not its generation prompt"
        marker = next((m for m in sorted(ends | {eos}, key=len, reverse=True) if trained.endswith(m)), None)
        assert marker, f"{turn}: the trained span {trained[-40:]!r} does not end with {ends} (or EOS)"
        core = trained[: -len(marker)]
        inner = ends - INSIDE_A_REPLY.get(entry["name"], set())
        assert not any(m in core for m in inner), f"{turn}: trained past an end-of-turn marker: {trained!r}"
        if newest.startswith(prompt):  # the reply is what the template writes after the generation prompt
            reply = newest[len(prompt) :]
            assert reply.startswith(trained) or (trained == reply + eos and not any(m in reply for m in ends)), (
                f"{turn}: {trained!r} is not the template's reply {reply!r}"
            )
        else:  # the prompt differs from the history's header: from the answer on, the reply as the history has it
            answer = core.split("</think>")[-1].lstrip()
            assert answer.strip() and (newest.endswith(answer) or answer + marker in newest), (
                f"{turn}: {answer!r} is not the reply as the template renders it in {newest[-200:]!r}"
            )
        own = set(re.findall(PLACEHOLDER, json.dumps(messages[index], ensure_ascii=False)))
        for placeholder in re.findall(PLACEHOLDER, text):
            if placeholder in own:
                assert placeholder in trained or placeholder not in newest, f"{turn}: {placeholder} untrained"
            else:
                assert placeholder not in trained, f"{turn}: another turn's {placeholder} is trained"
        assert any(p in trained for p in own), f"{turn}: none of the reply is trained"


def check_all(result: dict[str, Any]) -> dict[str, Any]:
    """The oracle over every trained row; returns the table line: history modes, rows trained, rows refused."""
    examples = result["examples"]
    by_row: dict[int, list] = {}
    for ids, trained, row, history in zip(
        examples["input_ids"], examples["trained"], examples["row"], examples["history"]
    ):
        by_row.setdefault(row, []).append((ids, trained, history))
    for row, found in by_row.items():
        check_row(result["entry"], result["tokenizer"], result["rows"][row], found)
    modes = sorted({h for h in examples["history"]})
    return {"history": "+".join(modes), "rows": len(result["rows"]), "trained": len(by_row)}


# template -> (history modes used, rows given, rows trained). Rows not trained are refused with a reason and
# counted (data.skip_invalid): a system turn the template raises on (Gemma-2, Mistral v0.1, Mixtral); replies
# without reasoning where the generation prompt opens <think> and the history drops it (DeepSeek-R1-Distill,
# TRL's DeepSeek-V3, QwQ); tool calls the template does not render (Granite 3.3, SmolLM3); OpenAI-style tool
# schemas Command-R+ cannot read; a tool-call turn Mistral-Nemo renders after a moved system prompt.
EXPECTED: dict[str, tuple[str, int, int]] = {
    "codellama-70b-instruct": ("per-turn", 8, 8),
    "command-r": ("whole", 8, 8),
    "command-r-plus-tool-use": ("per-turn", 10, 8),
    "command-r7b-tool-use": ("whole", 10, 10),
    "deepseek-coder-33b-instruct": ("whole", 8, 8),
    "deepseek-llm-7b-chat": ("whole", 8, 8),
    "deepseek-r1": ("whole", 13, 13),
    "deepseek-r1-distill-llama-8b": ("per-turn", 13, 3),
    "deepseek-v3": ("per-turn", 13, 3),
    "deepseek-v3.1": ("whole", 13, 13),
    "falcon-instruct": ("per-turn", 8, 8),
    "functionary-medium-v3.1": ("whole", 10, 10),
    "functionary-medium-v3.2": ("whole", 10, 10),
    "gemma-2": ("whole", 8, 4),
    "gemma-3": ("whole", 8, 8),
    "glm-4.5": ("per-turn", 13, 13),
    "gpt-oss-120b": ("per-turn+whole", 13, 13),
    "granite-3.3-2b-instruct": ("whole", 13, 11),
    "hermes-3-llama-3.1-8b-tool-use": ("per-turn+whole", 10, 10),
    "internlm2-chat-7b": ("whole", 8, 8),
    "llama-2-chat": ("whole", 8, 8),
    "llama-3-8b-instruct": ("whole", 8, 8),
    "llama-3.1-8b-instruct": ("whole", 10, 10),
    "llama-3.2-3b-instruct": ("whole", 10, 10),
    "mistral-7b-instruct-v0.1": ("whole", 8, 4),
    "mistral-7b-instruct-v0.3": ("whole", 10, 10),
    "mistral-nemo-instruct-2407": ("per-turn+whole", 10, 9),
    "mistral-small-3.2-24b-instruct-2506": ("whole", 10, 10),
    "mixtral-8x7b-instruct-v0.1": ("whole", 8, 4),
    "phi-3-mini-instruct": ("whole", 8, 8),
    "phi-3.5-mini-instruct": ("whole", 8, 8),
    "phi-4": ("whole", 8, 8),
    "phi-4-mini-instruct": ("whole", 8, 8),
    "qwen1.5-72b-chat": ("per-turn", 8, 8),
    "qwen2.5-7b-instruct": ("whole", 10, 10),
    "qwen3": ("per-turn+whole", 13, 13),
    "qwq-32b": ("per-turn+whole", 13, 3),
    "smollm3-3b": ("whole", 13, 11),
    "solar-10.7b-instruct": ("per-turn", 8, 8),
    "trl-qwen3-training": ("whole", 13, 13),
    "tulu-3": ("whole", 8, 8),
    "vicuna": ("per-turn", 8, 8),
    "zephyr-7b-beta": ("whole", 8, 8),
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_real_template_trains_with_a_mask_the_oracle_agrees_with(
    name, tmp_path, long_decoder, tiny_decoder, monkeypatch
):
    result = train_template(name, tmp_path, long_decoder, tiny_decoder, monkeypatch)
    assert result["summary"]["steps"] == 2
    line = check_all(result)
    assert (line["history"], line["rows"], line["trained"]) == EXPECTED[name]
    assert result["summary"]["skipped_rows"] == line["rows"] - line["trained"]  # refused rows are counted


def test_corpus_sources_are_recorded():
    """Every template ships with where it came from."""
    files = {path.stem for path in CORPUS.glob("*.jinja")}
    assert files == set(SOURCES) == set(EXPECTED)
    for entry in SOURCES.values():
        assert entry["repo"] and entry["path"] and len(entry["commit"]) == 40 and entry["licence"]


@pytest.mark.parametrize(
    ("name", "row", "says"),
    [
        ("gemma-2", 1, "row 1: the chat template failed to render it"),
        ("qwq-32b", 0, "row 1: turn 2: the template's generation prompt opens <think>"),
        ("granite-3.3-2b-instruct", 11, "row 1: turn 2: the template does not render this turn's tool call 'lookup'"),
    ],
)
def test_a_row_the_template_cannot_train_is_one_line_naming_it(name, row, says, tmp_path, long_decoder, tiny_decoder):
    """Without data.skip_invalid the first such row stops the run before any compute, naming file and row."""
    from sft_cli.errors import SftError

    entry = SOURCES[name]
    model = model_for(entry, long_decoder, tiny_decoder, tmp_path / "model")
    rows = conversations(entry)
    train = write_jsonl(tmp_path / "train.jsonl", rows[row:])
    values = {
        "name": name,
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "max_length": 4096},
        "schedule": {"max_steps": 1, "batch_size": 2},
        "engine": {"device": "cpu", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "run")},
    }
    with pytest.raises(SftError) as raised:
        commands.train(load_recipe(write_recipe(tmp_path / "recipe.yaml", values)), "finetune")
    message = str(raised.value)
    assert says in message.replace(str(train), "") and "\n" not in message and "data.skip_invalid" in message
    assert not (tmp_path / "run" / "model").exists()
