"""Data shapes for generative SFT, all normalised to OpenAI-style messages.

`messages`: [{"role": "system"|"user"|"assistant"|"tool", "content": str, "tool_calls"?: [...],
             "reasoning_content"?: str, "thinking"?: str, "name"?: str, "tool_call_id"?: str}, ...]
`sharegpt`: [{"from": "system"|"human"|"gpt", "value": str}, ...] (roles mapped; `data.roles` adds names)
`alpaca`:   instruction, optional input, output -> one user turn and one assistant turn
`prompt-response`: the prompt/response fields (a user turn and an assistant turn when a chat template is used)
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from sft_cli.errors import SftError

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


# Optional string fields a turn may carry to the template: the speaker's name, the id a tool result answers,
# and an assistant's reasoning (`reasoning_content`: Qwen3, DeepSeek-R1, GLM; `thinking`: gpt-oss).
MESSAGE_TEXT_FIELDS = ("name", "tool_call_id", "reasoning_content", "thinking")


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
        for name, value in (("instruction", instruction), ("input", extra), ("system", row.get("system"))):
            if not isinstance(value, str) and (name == "instruction" or value is not None):
                raise InvalidConversation(f"'{name}' is {type(value).__name__}, not text")
        user = instruction + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": user}]
        messages += [] if prompt else [{"role": "assistant", "content": row.get("output")}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": row["system"]})
    elif fmt == "prompt-response":
        value = row.get(fields.prompt_field)
        if isinstance(value, list):  # a conversational prompt (TRL's shape): the messages to continue
            messages = [_message(turn, index, "messages", names) for index, turn in enumerate(value, 1)]
        else:
            messages = [{"role": "user", "content": value}]
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
    if not isinstance(name, str):
        raise InvalidConversation(f"turn {index} has a '{role_key}' that is {type(name).__name__}, not a role name")
    if name not in names:
        raise InvalidConversation(f"turn {index} has unknown role '{name}' (map it with data.roles: {{{name}: user}})")
    message = {"role": names[name], "content": turn.get(content_key)}
    for key in MESSAGE_TEXT_FIELDS:
        if turn.get(key) is not None:
            if not isinstance(turn[key], str):
                raise InvalidConversation(f"turn {index} '{key}' is {type(turn[key]).__name__}, not a string")
            message[key] = turn[key]
    if turn.get("tool_calls") is not None:
        message["tool_calls"] = _tool_calls(turn["tool_calls"], index)
    return message


def _tool_calls(calls: Any, index: int) -> list:
    """`tool_calls`: a list of calls, each {"function": {"name", "arguments"}} (or name/arguments at the top)."""
    if not isinstance(calls, list):
        raise InvalidConversation(f"turn {index} tool_calls is {type(calls).__name__}, not a list of calls")
    for number, call in enumerate(calls, 1):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidConversation(f"turn {index} tool call {number} is not an object with a function name")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, (dict, str)):
            raise InvalidConversation(
                f"turn {index} tool call {number} arguments are {type(arguments).__name__}, not an object or JSON text"
            )
    return calls


def tools_of(row: dict[str, Any]) -> Optional[list]:
    """A row's `tools` (tool schemas for the template): a list of objects, a JSON string of one, or absent."""
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise InvalidConversation("'tools' is a string that is not JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidConversation("'tools' is not a list of tool objects")
    return tools or None


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
