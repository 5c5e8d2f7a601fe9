"""Preference rows in TRL's shapes as (prompt messages, chosen messages, rejected messages).

- standard: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages, `chosen` / `rejected` lists of assistant messages (or one message);
- implicit prompt: no prompt, `chosen` and `rejected` whole conversations (or strings) sharing a prefix, which
  becomes the prompt (TRL's `extract_prompt`).

A pair whose sides share no prompt, or whose completions are identical, raises InvalidConversation saying so.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from sft_cli.chat.formats import InvalidConversation, check_conversation

Messages = list[dict[str, Any]]


def _as_turns(value: Any, side: str) -> Any:
    """A list of messages, one message, or text (a JSON string of a list is parsed, as CSV files carry them)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, dict):
        return [value]
    if value is None or (isinstance(value, list) and not value):
        raise InvalidConversation(f"'{side}' is empty")
    if not isinstance(value, (str, list)):
        raise InvalidConversation(f"'{side}' is {type(value).__name__}, not text or a list of messages")
    return value


def _messages(turns: list, side: str) -> Messages:
    out = []
    for index, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or "role" not in turn:
            raise InvalidConversation(f"'{side}' turn {index} is not a message with a role")
        out.append({"role": turn["role"], "content": turn.get("content")})
    return out


def _string_prefix(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two strings ends (a space before the split belongs to the completions)."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):
        if chosen[index] != rejected[index]:
            if index and chosen[index - 1] == " ":
                index -= 1
            return index
    return min(len(chosen), len(rejected))


def pair_messages(
    row: dict[str, Any], prompt_field: str, chosen_field: str, rejected_field: str
) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen completion, rejected completion) as messages; InvalidConversation names what is wrong."""
    chosen = _as_turns(row.get(chosen_field), chosen_field)
    rejected = _as_turns(row.get(rejected_field), rejected_field)
    prompt_value: Optional[Any] = row.get(prompt_field)
    if type(chosen) is not type(rejected):
        raise InvalidConversation(f"'{chosen_field}' and '{rejected_field}' are not the same shape (text vs messages)")
    if prompt_value is None:  # implicit prompt: the shared beginning
        if isinstance(chosen, str):
            cut = _string_prefix(chosen, rejected)
            prompt: Messages = [{"role": "user", "content": chosen[:cut]}] if chosen[:cut].strip() else []
            chosen_side = [{"role": "assistant", "content": chosen[cut:]}]
            rejected_side = [{"role": "assistant", "content": rejected[cut:]}]
        else:
            chosen_messages, rejected_messages = _messages(chosen, chosen_field), _messages(rejected, rejected_field)
            shared = 0
            while (
                shared < min(len(chosen_messages), len(rejected_messages))
                and chosen_messages[shared] == rejected_messages[shared]
            ):
                shared += 1
            prompt = chosen_messages[:shared]
            chosen_side, rejected_side = chosen_messages[shared:], rejected_messages[shared:]
        if not prompt:
            raise InvalidConversation(
                f"'{chosen_field}' and '{rejected_field}' share no prompt (and there is no '{prompt_field}')"
            )
    else:
        prompt_turns = _as_turns(prompt_value, prompt_field)
        prompt = (
            [{"role": "user", "content": prompt_turns}]
            if isinstance(prompt_turns, str)
            else _messages(prompt_turns, prompt_field)
        )
        if isinstance(chosen, str):
            chosen_side = [{"role": "assistant", "content": chosen}]
            rejected_side = [{"role": "assistant", "content": rejected}]
        else:
            chosen_side, rejected_side = _messages(chosen, chosen_field), _messages(rejected, rejected_field)
    for side, name in ((chosen_side, chosen_field), (rejected_side, rejected_field)):
        if not side or side[0]["role"] != "assistant":
            raise InvalidConversation(f"the '{name}' completion does not start with an assistant message")
        check_conversation(prompt + side)
    if chosen_side == rejected_side:
        raise InvalidConversation(f"the '{chosen_field}' and '{rejected_field}' completions are identical")
    return prompt, chosen_side, rejected_side
