"""Data shapes for generative SFT, all normalised to OpenAI-style messages.

`messages`: [{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls"?: [...]}, ...]
`sharegpt`: [{"from": "system"|"human"|"gpt", "value": str}, ...] (roles mapped; `data.roles` adds names)
`alpaca`:   instruction, optional input, output -> one user turn and one assistant turn
`prompt-response`: the prompt/response fields (a user turn and an assistant turn when a chat template is used)
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from sft_cli.errors import SftError

FORMATS = ("auto", "prompt-response", "messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT and its relatives (LLaMA-Factory's `observation`, `function_call`) -> the four roles above.
DEFAULT_ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}


class InvalidConversation(ValueError):
    """A row that is not a trainable conversation; the message says what is wrong with it."""


def detect_format(columns: Sequence[str], requested: str, messages_field: Optional[str]) -> str:
    """`auto`: a messages column -> messages; conversations -> sharegpt; instruction + output -> alpaca."""
    if requested != "auto":
        return requested
    if messages_field and messages_field in columns:
        return "messages"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if "instruction" in columns and "output" in columns:
        return "alpaca"
    return "prompt-response"


def conversation_column(fmt: str, messages_field: Optional[str]) -> Optional[str]:
    """The column holding the turns for a conversational format."""
    if fmt == "messages":
        return messages_field or "messages"
    if fmt == "sharegpt":
        return messages_field or "conversations"
    return None


def role_names(extra: dict[str, str]) -> dict[str, str]:
    """The role map: the defaults plus `data.roles` (which may only map onto the four known roles)."""
    names = dict(DEFAULT_ROLE_NAMES)
    for name, role in extra.items():
        if role not in ROLES:
            raise SftError(f"data.roles.{name}: '{role}' is not one of {', '.join(ROLES)}")
        names[str(name)] = role
    return names


def _turns(value: Any) -> list:
    """A column value as a list of turns (a JSON string is parsed, as CSV files carry them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InvalidConversation("the turns are a string that is not JSON") from None
    if not isinstance(value, list) or not value:
        raise InvalidConversation("expected a non-empty list of turns")
    return value


def to_messages(
    row: dict[str, Any], fmt: str, column: Optional[str], names: dict[str, str], fields: Any, prompt: bool = False
) -> list:
    """One data row as validated OpenAI-style messages; raises InvalidConversation saying what is wrong.

    `prompt=True` reads a conversation to continue (`sft predict`, `sft chat`): it ends on a user (or tool)
    turn, and alpaca / prompt-response rows need no answer.
    """
    if fmt == "alpaca":
        instruction, extra = row.get("instruction"), row.get("input")
        user = str(instruction) + (f"\n\n{extra}" if extra not in (None, "") else "")
        messages = [{"role": "user", "content": user}]
        messages += [] if prompt else [{"role": "assistant", "content": row.get("output")}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "prompt-response":
        messages = [{"role": "user", "content": row.get(fields.prompt_field)}]
        messages += [] if prompt else [{"role": "assistant", "content": row.get(fields.response_field)}]
    else:
        messages = [_message(turn, index, fmt, names) for index, turn in enumerate(_turns(row[column]), 1)]
    check_conversation(messages, prompt)
    return messages


def _message(turn: Any, index: int, fmt: str, names: dict[str, str]) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise InvalidConversation(f"turn {index} is not an object")
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    if role_key not in turn:
        other = "role/content" if fmt == "sharegpt" else "from/value"
        hint = (
            f" (it has {other}: set data.format)" if ("role" in turn if fmt == "sharegpt" else "from" in turn) else ""
        )
        raise InvalidConversation(f"turn {index} has no '{role_key}'{hint}")
    name = turn[role_key]
    if name not in names:
        raise InvalidConversation(f"turn {index} has unknown role '{name}' (map it with data.roles: {{{name}: user}})")
    message = {"role": names[name], "content": turn.get(content_key)}
    for key in ("tool_calls", "name", "tool_call_id"):
        if turn.get(key) is not None:
            message[key] = turn[key]
    return message


def check_conversation(messages: list[dict[str, Any]], prompt: bool = False) -> None:
    """Roles alternate (system first, user/assistant in turn, tool results after tool calls); text is text.

    A training conversation needs an assistant turn; a prompt (`prompt=True`) must end on a user or tool turn.
    """
    previous = None
    for index, message in enumerate(messages, 1):
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise InvalidConversation(f"turn {index} has unknown role '{role}'")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise InvalidConversation(f"turn {index} ({role}) content is {type(content).__name__}, not a string")
        allowed = {
            "system": (None,),
            "user": (None, "system", "assistant", "tool"),
            "assistant": ("user", "tool"),
            "tool": ("assistant", "tool"),
        }[role]
        if previous not in allowed:
            after = f"after '{previous}'" if previous else "first"
            raise InvalidConversation(f"turn {index} is '{role}' {after} — turns must alternate user/assistant")
        if role == "tool" and previous == "assistant" and not messages[index - 2].get("tool_calls"):
            raise InvalidConversation(f"turn {index} is a tool result but turn {index - 1} made no tool call")
        previous = role
    if prompt:
        if previous not in ("user", "tool"):
            raise InvalidConversation(f"the conversation ends on a '{previous}' turn, not a user turn to answer")
    elif not any(m["role"] == "assistant" for m in messages):
        raise InvalidConversation("no assistant turn to train on")
