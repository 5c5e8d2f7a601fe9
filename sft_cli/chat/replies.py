"""What a reply is, in text: its visible content, its tool calls, where its own text ends, and its completion
when a template's generation prompt differs from how it renders the history before the reply."""

from __future__ import annotations

import json
import re
from typing import Optional


class MaskError(ValueError):
    """The template and this conversation do not give a trustworthy mask; the message says why."""


def called_functions(message: dict) -> list[str]:
    """The function names of a turn's tool calls."""
    names = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.append(function["name"])
    return names


def own_text_end(completion: str, message: dict, markers: Optional[re.Pattern] = None) -> int:
    """Where the reply's own text ends in its completion: after its content, else after its last tool-call
    argument; markers before that point (gpt-oss closes its reasoning message with `<|end|>`) do not end it.

    Text inside a marker is never the reply's (a reply `end` is also in `<|im_end|>`): `markers` matches them.
    """
    if markers is not None:
        completion = markers.sub(lambda found: "\0" * len(found.group(0)), completion)
    visible = visible_content(message)
    if visible and visible in completion:
        return completion.rindex(visible) + len(visible)
    end = 0
    for call in message.get("tool_calls") or []:
        function = call.get("function", call) if isinstance(call, dict) else {}
        arguments = function.get("arguments") if isinstance(function, dict) else None
        values = arguments.values() if isinstance(arguments, dict) else [arguments]
        for value in values:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            if text and text in completion:
                end = max(end, completion.rindex(text) + len(text))
    return end


REASONING_OPENER = re.compile(r"<(think|thinking|reasoning)>\s*$")
WORDS = re.compile(r"<[^<>\s]+>|[^\s<]+")


def realigned_completion(prompt: str, newest: str, messages: list, index: int) -> str:
    """The completion of a reply whose generation prompt is not a prefix of the history rendered with it.

    Templates differ there in harmless ways (Vicuna/Falcon whitespace, CodeLlama-70B's `Destination: user`
    header, Mistral-Nemo writing the system prompt into the last user turn only), or open a reasoning block the
    history drops (DeepSeek-R1, QwQ: the prompt ends `<think>\n`). The reply is trained after the generation
    prompt from its content on (as the template renders it, through its marker) when the header before it in
    the history says nothing the generation prompt's header does not; after a reasoning opener the reply's own
    reasoning comes first (a `<think>` block in its content, or `reasoning_content`). MaskError otherwise.
    """
    message = messages[index]
    content = message.get("content") or ""
    turn = f"turn {index + 1}"
    opener = REASONING_OPENER.search(prompt)
    answer = content.split(f"</{opener.group(1)}>")[-1].strip() if opener else content.strip()
    if not answer or answer not in newest:
        raise MaskError(
            f"{turn}: the template's generation prompt differs from how it renders the history before the reply, "
            "and the reply has no text to align it on"
        )
    position = newest.rindex(answer)
    previous = visible_content(messages[index - 1]) if index else ""
    history_header = newest[newest.rfind(previous, 0, position) + len(previous) : position] if previous else ""
    prompt_header = prompt[prompt.rfind(previous) + len(previous) :] if previous and previous in prompt else prompt
    if not set(WORDS.findall(history_header)) <= set(WORDS.findall(prompt_header)):
        raise MaskError(
            f"{turn}: the template renders the reply after a different history than its generation prompt "
            f"({history_header.strip()!r} before the reply is not in the prompt's header {prompt_header.strip()!r})"
        )
    if not opener:
        return newest[position:]
    tag = f"<{opener.group(1)}>"
    reasoning = message.get("reasoning_content") or message.get("thinking")
    if content.lstrip().startswith(tag):
        body = content.lstrip()[len(tag) :].lstrip()
    elif reasoning:
        body = f"{reasoning.strip()}\n</{opener.group(1)}>\n\n{content.strip()}"
    else:
        raise MaskError(
            f"{turn}: the template's generation prompt opens {tag} and drops reasoning from the history — give the "
            f"reply's reasoning as a {tag}...</{opener.group(1)}> block at the start of its content, or as "
            "reasoning_content"
        )
    return body[: body.rindex(answer)] + newest[position:]


def visible_content(message: dict) -> str:
    """The reply's content a template renders for sure: without a `<think>` block some templates drop."""
    content = (message.get("content") or "").strip()
    if "</think>" in content:
        content = content.split("</think>")[-1].strip()
    return content
