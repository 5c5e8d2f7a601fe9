"""Rows -> training examples for generative SFT: token ids plus a per-token `trained` flag.

Prompt/response pairs with a format-string template keep the classic path (the prompt is cut from the
left so the response survives `max_length`); everything conversational — messages, sharegpt, alpaca,
pairs under a chat template — goes through the chat encoder and its checked mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from sft_cli.chat.formats import InvalidConversation, to_messages, tools_of
from sft_cli.chat.masks import ROLE_IDS, ROLE_NAMES, ChatEncoder, MaskError, role_token_counts
from sft_cli.data.tables import DataCache, SkipCounter, cached_map, keep_usable
from sft_cli.errors import SftError
from sft_cli.tasks.text import tokenizer_fingerprint

DEFAULT_TEMPLATE = "{prompt}\n"
NO_TRAINED_TOKEN = "no trained token within data.max_length"


def render_prompt(prompt: str, template: Optional[str]) -> str:
    """The text the model sees before the response, from a format string with {prompt}."""
    try:
        return (template or DEFAULT_TEMPLATE).format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise SftError(f"data.template: '{template}' is not a format string with {{prompt}} ({err})") from None


@dataclass
class RowReader:
    """How to read one split's rows: the data shape, its column, and the encoder."""

    fmt: str
    column: Optional[str]
    roles: dict[str, str]
    data: Any  # DataConfig
    chat: Optional[ChatEncoder]
    tokenizer: Any

    def messages(self, row: dict, prompt: bool = False) -> list:
        return to_messages(row, self.fmt, self.column, self.roles, self.data, prompt)

    def null_reason(self, row: dict) -> Optional[str]:
        fields = [self.column] if self.column else self._pair_fields()
        for field in fields:
            if row.get(field) is None:
                return f"null {field}"
        return None

    def text_fields(self) -> list[str]:
        """The fields the classic prompt/response path reads as text."""
        return [self.data.prompt_field, self.data.response_field]

    def _pair_fields(self) -> list[str]:
        if self.fmt == "alpaca":
            return ["instruction", "output"]
        return [self.data.prompt_field, self.data.response_field]

    def encode_pair(self, row: dict) -> tuple[list[int], list[int]]:
        """The classic path: rendered prompt + response + EOS; the prompt is truncated from the left."""
        tokenizer, max_length = self.tokenizer, self.data.max_length
        prompt = tokenizer(render_prompt(row[self.data.prompt_field], self.data.template), add_special_tokens=False)
        response = tokenizer(row[self.data.response_field], add_special_tokens=False)["input_ids"]
        response = (response + [tokenizer.eos_token_id])[:max_length]
        kept = prompt["input_ids"][-(max_length - len(response)) :] if max_length > len(response) else []
        return kept + response, [0] * len(kept) + [1] * len(response)


COLUMNS = ("input_ids", "trained", "length", "role_tokens", "role_trained", "row", "history", "why", "skip")


def encode_split(
    table: Any, reader: RowReader, key: str, location: str, skipped: SkipCounter, cache: DataCache = DataCache()
) -> tuple[Any, list[int]]:
    """Tokenize and mask every row (cached); rows that cannot train are counted by reason and left out.

    A row gives one example, or one per assistant turn when its template needs `per-turn` history. Returns the
    examples and the indices of the rows they came from (each row once).
    """
    data, skip_invalid = reader.data, reader.data.skip_invalid

    def encode(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in COLUMNS}
        for offset, index in enumerate(indices):
            row = {name: values[offset] for name, values in rows.items()}
            for example in _encode_row(row, reader, key, location, index, skip_invalid):
                for name, value in zip(COLUMNS, (*example[:2], len(example[0]), *example[2:4], index, *example[4:])):
                    out[name].append(value)
        return out

    fingerprint = (
        "generation-v4",
        reader.fmt,
        reader.column,
        sorted(reader.roles.items()),
        data.prompt_field,
        data.response_field,
        data.template,
        data.max_length,
        skip_invalid,
        reader.chat.template.text if reader.chat else None,
        reader.chat.train_on if reader.chat else None,
        reader.chat.history if reader.chat else None,
        tokenizer_fingerprint(reader.tokenizer),
    )
    encoded = cached_map(table, encode, str(fingerprint), with_indices=True, cache=cache)
    encoded = keep_usable(encoded, key, location, skipped, "example")
    return encoded, list(dict.fromkeys(encoded["row"]))


def history_summary(encoded: Any) -> dict[str, Any]:
    """How the conversations were laid out: examples per history mode, and why `auto` chose per-turn."""
    counts: dict[str, int] = {}
    for mode in encoded["history"]:
        if mode:
            counts[mode] = counts.get(mode, 0) + 1
    why = next((w for w in encoded["why"] if w), "")
    return {"examples": counts, **({"per_turn_because": why} if why else {})} if counts else {}


# ids, trained, tokens per role, trained per role, history, why per-turn, skip reason
Example = tuple[list[int], list[int], list[int], list[int], str, str, str]


def _encode_row(row: dict, reader: RowReader, key: str, location: str, index: int, skip_invalid: bool) -> list[Example]:
    """The examples of one row (see Example)."""
    empty = [0] * len(ROLE_NAMES)
    null = reader.null_reason(row)
    if null:
        return [([], [], empty, empty, "", "", null)]
    if reader.chat is None:
        bad = next((f for f in reader.text_fields() if not isinstance(row.get(f), str)), None)
        if bad is not None:
            if skip_invalid:
                return [([], [], empty, empty, "", "", f"non-string {bad}")]
            raise SftError(
                f"{key}: {location} row {index + 1}: '{bad}' is {type(row[bad]).__name__}, not text — fix the row, "
                "or set data.skip_invalid: true to skip such rows"
            )
        ids, trained = reader.encode_pair(row)
        prompt_tokens = trained.count(0)
        tokens = _role_counts({ROLE_IDS["user"]: prompt_tokens, ROLE_IDS["assistant"]: len(ids) - prompt_tokens})
        return [(ids, trained, tokens, _role_counts({ROLE_IDS["assistant"]: len(ids) - prompt_tokens}), "", "", "")]
    try:
        messages = reader.messages(row)
        segments = reader.chat.encode(messages, tools_of(row))
    except (InvalidConversation, MaskError) as err:
        if skip_invalid:
            return [([], [], empty, empty, "", "", "invalid conversation")]
        hint = "fix the row, or set data.skip_invalid: true to skip such rows"
        prefix = f"{key}: {location}" if isinstance(err, InvalidConversation) else f"data.chat_template: {location}"
        raise SftError(f"{prefix} row {index + 1}: {err} — {hint}") from None
    examples = []
    for segment in segments:
        _fit(segment, reader.data.max_length)
        if not any(segment.trained[1:]):
            examples.append(([], [], empty, empty, "", "", NO_TRAINED_TOKEN))
            continue
        tokens, trained = role_token_counts(segment)
        examples.append((segment.input_ids, segment.trained, tokens, trained, segment.history, segment.why, ""))
    return examples


def _fit(segment: Any, limit: int) -> None:
    """Cut an example to `data.max_length`: a per-turn segment loses its oldest history first, else the end goes."""
    excess = len(segment.input_ids) - limit
    if excess <= 0:
        return
    if segment.history == "per-turn":
        prompt = segment.trained.index(1) if 1 in segment.trained else len(segment.trained)
        cut = min(excess, prompt)
        segment.input_ids, segment.trained, segment.roles = (
            segment.input_ids[cut:],
            segment.trained[cut:],
            segment.roles[cut:],
        )
    segment.input_ids, segment.trained, segment.roles = (
        segment.input_ids[:limit],
        segment.trained[:limit],
        segment.roles[:limit],
    )


def _role_counts(values: dict[int, int]) -> list[int]:
    return [values.get(i, 0) for i in range(len(ROLE_NAMES))]


def trained_tokens_per_role(encoded: Any) -> dict[str, dict[str, Any]]:
    """{role: {tokens, trained, share}} over a whole encoded split (for the plan and summary.json)."""
    import numpy as np

    tokens = np.asarray(encoded["role_tokens"]).sum(axis=0) if len(encoded) else np.zeros(len(ROLE_NAMES))
    trained = np.asarray(encoded["role_trained"]).sum(axis=0) if len(encoded) else np.zeros(len(ROLE_NAMES))
    return {
        ROLE_NAMES[i]: {"tokens": int(tokens[i]), "trained": int(trained[i]), "share": round(trained[i] / tokens[i], 4)}
        for i in range(len(ROLE_NAMES))
        if tokens[i]
    }


def eval_turns(row: dict, reader: RowReader) -> tuple[list, str]:
    """(history, reference) for an eval conversation: everything before the final assistant turn, and that turn."""
    messages = reader.messages(row)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last].get("content") or ""
