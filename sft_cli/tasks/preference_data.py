"""Preference rows -> pair examples: shared prompt ids, and the chosen and rejected completion ids.

A completion's tokens are what the chat encoder's proven mask trains for that reply (through its end-of-turn
marker) when the data is conversational or a chat template is set; else the classic prompt/response path:
`data.template` around the prompt, the completion + EOS. Both sides must render the prompt to the same tokens,
so a pair is one prompt and two continuations of it. Tokenized once (cached with the data).
"""

from __future__ import annotations

from typing import Any, Optional

from sft_cli.chat.formats import InvalidConversation, tools_of
from sft_cli.chat.masks import ChatEncoder, MaskError
from sft_cli.chat.preference_pairs import Messages, pair_messages
from sft_cli.data.tables import DataCache, SkipCounter, cached_map, keep_usable
from sft_cli.errors import SftError
from sft_cli.tasks.generation_data import render_prompt
from sft_cli.tasks.text import tokenizer_fingerprint

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "length", "row", "skip")
SKIP_HINT = "fix the row, or set data.skip_invalid: true to skip such rows"


def is_conversational(row: dict, data: Any) -> bool:
    """Whether a row carries messages (lists) rather than strings in its prompt or completion fields."""
    return any(isinstance(row.get(f), (list, dict)) for f in (data.prompt_field, data.chosen_field))


class PairEncoder:
    """Turns one preference row into (prompt ids, chosen ids, rejected ids) for one tokenizer and template."""

    def __init__(self, tokenizer: Any, data: Any, chat: Optional[ChatEncoder]):
        self.tokenizer, self.data, self.chat = tokenizer, data, chat

    def messages(self, row: dict) -> tuple[Messages, Messages, Messages]:
        """(prompt, chosen, rejected) messages; InvalidConversation when the row is no valid pair."""
        return pair_messages(row, self.data.prompt_field, self.data.chosen_field, self.data.rejected_field)

    def prompt_ids(self, prompt: Messages, tools: Any = None) -> list[int]:
        """The ids the model continues: the generation prompt of the history, or the formatted prompt."""
        if self.chat is not None:
            return self.chat.prompt_ids(prompt, tools)
        return self.tokenizer(render_prompt(_text(prompt), self.data.template), add_special_tokens=False)["input_ids"]

    def encode(self, row: dict) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, chosen completion ids, rejected completion ids), cut to data.max_length."""
        prompt, chosen, rejected = self.messages(row)
        tools = tools_of(row)
        if self.chat is None:
            if len(prompt) != 1 or prompt[0]["role"] != "user":
                raise InvalidConversation("the prompt is a conversation: set data.chat_template to render it")
            prompt_ids = self.prompt_ids(prompt)
            sides = [self._plain_completion(side) for side in (chosen, rejected)]
        else:
            encoded = [self._chat_side(prompt, side, tools) for side in (chosen, rejected)]
            if encoded[0][0] != encoded[1][0]:
                raise MaskError("the chat template renders the prompt differently before the two completions")
            prompt_ids, sides = encoded[0][0], [ids for _, ids in encoded]
        return _fit(prompt_ids, sides[0], sides[1], self.data.max_length, self.tokenizer)

    def _plain_completion(self, side: Messages) -> list[int]:
        if len(side) != 1:
            raise InvalidConversation("a completion of several messages needs data.chat_template")
        return self.tokenizer(_text(side), add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def _chat_side(self, prompt: Messages, side: Messages, tools: Any) -> tuple[list[int], list[int]]:
        """The prompt's ids and the reply's trained ids (the proven mask of the final assistant turn)."""
        if len(side) != 1:
            raise InvalidConversation(f"a completion is one assistant reply; this one has {len(side)} messages")
        segment = self.chat.encode(prompt + side, tools)[-1]
        first = segment.trained.index(1)
        last = len(segment.trained) - segment.trained[::-1].index(1)
        return segment.input_ids[:first], segment.input_ids[first:last]


def _text(messages: Messages) -> str:
    content = messages[0].get("content")
    if not isinstance(content, str):
        raise InvalidConversation(f"'{messages[0]['role']}' content is {type(content).__name__}, not text")
    return content


def _fit(
    prompt: list[int], chosen: list[int], rejected: list[int], limit: int, tokenizer: Any
) -> tuple[list[int], list[int], list[int]]:
    """Each side (prompt + completion) within `limit` tokens: completions keep their start, the prompt its end."""
    chosen, rejected = chosen[: max(limit - 1, 1)], rejected[: max(limit - 1, 1)]
    if chosen == rejected:
        raise InvalidConversation(f"the completions are identical within data.max_length ({limit} tokens)")
    keep = max(limit - max(len(chosen), len(rejected)), 1)
    prompt = prompt[-keep:] or [
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ]
    return prompt, chosen, rejected


def encode_pairs(
    table: Any, encoder: PairEncoder, key: str, location: str, skipped: SkipCounter, cache: DataCache = DataCache()
) -> Any:
    """Tokenize every pair (cached); invalid pairs fail naming file and row, or are skipped and counted."""
    data = encoder.data

    def encode(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in COLUMNS}
        for offset, index in enumerate(indices):
            row = {name: values[offset] for name, values in rows.items()}
            try:
                prompt, chosen, rejected = encoder.encode(row)
                reason = ""
            except (InvalidConversation, MaskError) as err:
                if not data.skip_invalid:
                    prefix = key if isinstance(err, InvalidConversation) else "data.chat_template"
                    raise SftError(f"{prefix}: {location} row {index + 1}: {err} — {SKIP_HINT}") from None
                prompt, chosen, rejected, reason = [], [], [], "invalid pair"
            for name, value in zip(
                COLUMNS, (prompt, chosen, rejected, len(prompt) + len(chosen) + len(rejected), index, reason)
            ):
                out[name].append(value)
        return out

    settings = (
        "preference-v1",
        data.prompt_field,
        data.chosen_field,
        data.rejected_field,
        data.template,
        data.max_length,
        data.skip_invalid,
        encoder.chat.template.text if encoder.chat else None,
        encoder.chat.history if encoder.chat else None,
        tokenizer_fingerprint(encoder.tokenizer),
    )
    encoded = cached_map(table, encode, str(settings), with_indices=True, cache=cache)
    return keep_usable(encoded, key, location, skipped, "pair")
