"""`sft predict` and `sft chat` for generation models: prompts rendered as in training, then decoded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import AutoModelForCausalLM

from sft_cli.chat.formats import conversation_column, detect_format, role_names, tools_of
from sft_cli.chat.masks import ChatEncoder
from sft_cli.chat.templates import prepare_tokenizer
from sft_cli.data.tables import require_columns_named
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.decoding import DecodeSettings, generate
from sft_cli.tasks.generation_data import RowReader, render_prompt
from sft_cli.tasks.text import ensure_pad_token, input_problem, load_tokenizer

GENERATION_FILE = "sft_generation.json"  # in model/: chat template or format string, for predict and chat


class GenerationPredictor:
    """Reads prompts for a trained generation model and decodes them: `sft predict` and `sft chat` through
    GenerationTask, which holds one (composition: the task's training half never sees this state)."""

    def __init__(self, recipe: Any, tokenizer: Any, chat: Optional[ChatEncoder], prompt_template: Optional[str]):
        self.recipe, self.tokenizer, self.chat, self.prompt_template = recipe, tokenizer, chat, prompt_template
        self.input_format = "prompt-response"
        self.input_reader: Any = None

    @classmethod
    def load(cls, recipe: Any, model_dir: str) -> tuple[GenerationPredictor, torch.nn.Module]:
        """The predictor (tokenizer, template as trained) and the model from a trained model directory."""
        tokenizer = load_tokenizer(model_dir, recipe.backbone)
        info = _generation_info(Path(model_dir), recipe, tokenizer)
        chat = None
        if info["chat"]:
            chat = ChatEncoder(tokenizer, prepare_tokenizer(tokenizer, None, model_dir), "assistant")
        ensure_pad_token(tokenizer)
        model = bb.load_trained(AutoModelForCausalLM, model_dir)
        set_stop_tokens(bb.unwrap(model), tokenizer)
        return cls(recipe, tokenizer, chat, info["template"]), model

    def check_input(self, columns: list[str]) -> None:
        """Pick the input's format from its columns (as training did) and refuse missing columns."""
        data = self.recipe.data
        self.input_format = detect_format(columns, data.format, data.messages_field) if self.chat else "prompt-response"
        column = conversation_column(self.input_format, data.messages_field)
        needed = {"alpaca": ["instruction"], "prompt-response": [data.prompt_field]}.get(self.input_format, [column])
        require_columns_named(columns, needed, "data.messages_field" if column else "data.prompt_field", "--input")
        self.input_reader = RowReader(
            self.input_format, column, role_names(dict(data.roles)), data, self.chat, self.tokenizer
        )

    def predict_length(self, row: dict) -> int:
        """The prompt's length in characters (rows of similar length are decoded together)."""
        key = self.input_reader.column or (
            "instruction" if self.input_format == "alpaca" else self.recipe.data.prompt_field
        )
        return len(str(row.get(key) or ""))

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        """Every row is something to continue: a prompt, or a conversation that ends on a user turn."""
        from sft_cli.chat.formats import InvalidConversation

        skip_invalid = self.recipe.data.skip_invalid
        problems: list[Optional[str]] = []
        for number, row in enumerate(rows, first):
            if self.chat is None:
                field = self.recipe.data.prompt_field
                problems.append(input_problem(row.get(field), field, number, skip_invalid))
                continue
            try:
                self.prompt_ids(self.input_reader.messages(row, prompt=True), tools_of(row))
                problems.append(None)
            except InvalidConversation as err:
                if not skip_invalid:
                    raise SftError(
                        f"--input row {number}: {err} — fix the row, or set data.skip_invalid: true to skip such rows"
                    ) from None
                problems.append("invalid conversation")
        return problems

    def prompt_ids(self, messages: list, tools: Any = None) -> list[int]:
        """Token ids of a conversation (or a lone prompt) with the generation prompt, as training rendered it."""
        if self.chat is not None:
            return self.chat.prompt_ids(messages, tools)
        text, eos = "", self.tokenizer.eos_token
        for turn in messages:  # a format-string model: each exchange rendered as trained, joined
            if turn["role"] == "user":
                text += render_prompt(turn["content"], self.prompt_template)
            elif turn["role"] == "assistant":
                text += (turn["content"] or "") + eos
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.recipe.data.max_length :]

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        """Decode every row's prompt with the `predict:` settings."""
        prompts = [self.prompt_ids(self.input_reader.messages(row, prompt=True), tools_of(row)) for row in rows]
        outputs = generate(bb.unwrap(model), self.tokenizer, prompts, decode_settings(settings))
        return [{"prediction": o.text, "stopped": o.stopped, "num_tokens": len(o.ids)} for o in outputs]


def decode_settings(settings: Any) -> DecodeSettings:
    """DecodeSettings from a recipe's `predict:` section (or `eval:`, which never samples)."""
    return DecodeSettings(
        max_new_tokens=settings.max_new_tokens,
        num_beams=settings.num_beams,
        length_penalty=settings.length_penalty,
        no_repeat_ngram_size=settings.no_repeat_ngram_size,
        do_sample=getattr(settings, "do_sample", False),
        temperature=getattr(settings, "temperature", 1.0),
        top_p=getattr(settings, "top_p", 1.0),
        seed=getattr(settings, "seed", None),
    )


def _generation_info(model_dir: Path, recipe: Any, tokenizer: Any) -> dict[str, Any]:
    """How the model was trained to be prompted: recorded in model/, else inferred from the recipe."""
    path = model_dir / GENERATION_FILE
    if path.exists():
        return json.loads(path.read_text())
    data = recipe.data
    chat = bool(getattr(tokenizer, "chat_template", None)) and (
        data.chat_template is not None or data.template == "chat" or data.format not in ("auto", "prompt-response")
    )
    return {"chat": chat, "template": data.template}


def set_stop_tokens(model: torch.nn.Module, tokenizer: Any) -> None:
    """Generation stops at the (end-of-turn) EOS and pads with the pad token, in config and generation_config."""
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if config is not None:
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
