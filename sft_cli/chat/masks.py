"""The loss mask of a conversation, computed for any Jinja template and checked, failing closed.

How: render the conversation whole, and each growing prefix of it (after every turn, and with the
generation prompt before every assistant turn). Each prefix must be a string prefix of the whole; the
whole is tokenized once with offsets, and each prefix boundary must fall between two tokens. An assistant
turn trains from the end of its generation prompt through the template's end-of-turn token. At start-up
`verify` also tokenizes the prefixes of real rows on their own and requires each to be a token prefix of
the whole — the property that makes training tokens equal to what inference tokenizes.

Every failure says what broke: a rewritten history, tokens merging across a turn boundary, a doubled BOS,
an end-of-turn token that would never be trained, assistant text outside the mask, nothing to train on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from sft_cli.chat.formats import InvalidConversation
from sft_cli.chat.templates import ChatTemplate, render

TRAIN_ON = ("assistant", "last", "all")
ROLE_IDS = {"system": 0, "user": 1, "assistant": 2, "tool": 3}
TEMPLATE_ROLE = 4  # tokens the template writes outside any turn (none in the usual templates)
ROLE_NAMES = [*ROLE_IDS, "template"]


class MaskError(ValueError):
    """The template and this conversation do not give a trustworthy mask; the message says why."""


@dataclass
class EncodedConversation:
    """Token ids, which tokens are training targets (1) or not (0), and each token's role id."""

    input_ids: list[int]
    trained: list[int]
    roles: list[int]


class ChatEncoder:
    """Turns validated messages into token ids and a loss mask for one template and `loss.train_on`."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, train_on: str = "assistant"):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.bos_id = tokenizer.bos_token_id
        self.markers = _special_text(tokenizer)

    def check_text(self, messages: list, tools: Any = None) -> None:
        """Refuse a conversation whose text spells a special token (`<|im_end|>` typed in a reply): tokenized,
        it would become that token and forge a turn boundary, so it is an invalid row, not training data."""
        if self.markers is None:
            return
        for index, message in enumerate(messages, 1):
            texts = [message.get("content") or ""] + [
                json.dumps(c, ensure_ascii=False) for c in message.get("tool_calls") or []
            ]
            for text in texts:
                found = self.markers.search(text)
                if found:
                    raise InvalidConversation(
                        f"turn {index} contains the special token {found.group(0)} as text (it would be read as that "
                        "token, forging the conversation's structure)"
                    )

    def render(self, messages: list, generation_prompt: bool = False, tools: Any = None) -> str:
        return render(self.tokenizer, messages, self.template.text, generation_prompt, tools)

    def prompt_ids(self, messages: list, tools: Any = None) -> list[int]:
        """The history with the generation prompt, tokenized as inference tokenizes it."""
        return self.tokenizer(self.render(messages, True, tools), add_special_tokens=False)["input_ids"]

    def boundaries(self, messages: list, tools: Any = None) -> tuple[str, list[int], dict[int, int]]:
        """The whole text, the char offset where each turn ends, and where each assistant reply starts."""
        full = self.render(messages, tools=tools)
        ends, reply_starts = [], {}
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                prompt = self.render(messages[:index], True, tools) if index else ""
                if not full.startswith(prompt):
                    raise MaskError(
                        f"the history with the generation prompt before turn {index + 1} is not a prefix of the "
                        "whole conversation (the template renders training and inference differently)"
                    )
                reply_starts[index] = len(prompt)
            prefix = self.render(messages[: index + 1], tools=tools)
            if not full.startswith(prefix):
                raise MaskError(
                    f"the conversation up to turn {index + 1} is not a prefix of the whole (the template rewrites history)"
                )
            ends.append(len(prefix))
        return full, ends, reply_starts

    def encode(self, messages: list, tools: Any = None) -> EncodedConversation:
        """Ids, mask and roles for one conversation; raises MaskError when the mask cannot be trusted."""
        self.check_text(messages, tools)
        full, ends, reply_starts = self.boundaries(messages, tools)
        encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            raise MaskError(
                "the conversation starts with a doubled BOS token (the template and tokenizer both add one)"
            )
        roles = [TEMPLATE_ROLE] * len(ids)
        start = 0
        for index, end in enumerate(ends):
            first, last = _token_at(offsets, start, index), _token_at(offsets, end, index + 1)
            roles[first:last] = [ROLE_IDS[messages[index]["role"]]] * (last - first)
            start = end
        trained = [1] * len(ids) if self.train_on == "all" else [0] * len(ids)
        if self.train_on != "all":
            replies = sorted(reply_starts)
            for index in replies[-1:] if self.train_on == "last" else replies:
                first, last = self._reply_span(ids, offsets, reply_starts[index], ends[index], index)
                self._check_covered(full, offsets, first, last, messages[index], index)
                trained[first:last] = [1] * (last - first)
        if not any(trained[1:]):
            raise MaskError("the conversation has no trained token")
        return EncodedConversation(ids, trained, roles)

    def _reply_span(
        self, ids: list[int], offsets: list, reply_start: int, turn_end: int, index: int
    ) -> tuple[int, int]:
        """Tokens of an assistant reply: from the end of the generation prompt through the end-of-turn token."""
        first, limit = _token_at(offsets, reply_start, index), _token_at(offsets, turn_end, index + 1)
        eot = self.template.end_of_turn_id
        for position in range(first, limit):
            if ids[position] == eot:
                return first, position + 1
        raise MaskError(
            f"turn {index + 1}: the end-of-turn token {self.template.end_of_turn} does not close the assistant reply, "
            "so it would never be trained and the model would not learn to stop"
        )

    @staticmethod
    def _check_covered(full: str, offsets: list, first: int, last: int, message: dict, index: int) -> None:
        content = (message.get("content") or "").strip()
        if not content:
            return
        span = full[offsets[first][0] : offsets[last - 1][1]] if last > first else ""
        if content not in span:
            raise MaskError(f"turn {index + 1}: the assistant's text is not fully covered by the trained tokens")

    def verify(self, conversations: list[tuple[list, Any]]) -> None:
        """Tokenize each prefix on its own: it must be a token prefix of the whole (no boundary merges).

        Also cross-checks a template's `{% generation %}` markers, when it has them, against the mask.
        """
        tokenize = self.tokenizer
        for messages, tools in conversations:
            full, ends, reply_starts = self.boundaries(messages, tools)
            whole = tokenize(full, add_special_tokens=False)["input_ids"]
            for index in range(len(messages)):
                texts = [full[: ends[index]]] + ([full[: reply_starts[index]]] if index in reply_starts else [])
                for text in texts:
                    prefix = tokenize(text, add_special_tokens=False)["input_ids"]
                    if whole[: len(prefix)] != prefix:
                        raise MaskError(
                            f"turn {index + 1}: the rendered prefix is not a token prefix of the whole conversation "
                            "(tokens merge across the turn boundary)"
                        )
            if self.train_on == "assistant" and _has_generation_markers(self.template.text):
                self._cross_check(messages, tools)

    def _cross_check(self, messages: list, tools: Any) -> None:
        marked = self.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=self.template.text,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )["assistant_masks"]
        ours = self.encode(messages, tools).trained
        if list(marked) != ours:
            differ = [i for i, (a, b) in enumerate(zip(marked, ours)) if a != b][:5]
            raise MaskError(f"the template's {{% generation %}} markers disagree with the mask at tokens {differ}")


def _special_text(tokenizer: Any) -> Optional[re.Pattern]:
    """A pattern matching the text of the tokenizer's special tokens and markup-like added tokens, or None."""
    texts = set(tokenizer.all_special_tokens)
    for token in tokenizer.added_tokens_decoder.values():
        if token.special or re.fullmatch(r"[<\[].+[>\]]", token.content):
            texts.add(token.content)
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _token_at(offsets: list, char: int, turn: int) -> int:
    """The index of the first token at or after a char boundary; a token straddling it is a merge."""
    for index, (start, end) in enumerate(offsets):
        if start >= char:
            return index
        if start < char < end:
            raise MaskError(f"turn {turn}: a token spans the boundary between two turns (tokens merge across it)")
    return len(offsets)


def _has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def role_token_counts(encoded: EncodedConversation) -> tuple[list[int], list[int]]:
    """(tokens, trained tokens) per role id, for the plan's shares and summary.json."""
    tokens, trained = [0] * len(ROLE_NAMES), [0] * len(ROLE_NAMES)
    for role, target in zip(encoded.roles, encoded.trained):
        tokens[role] += 1
        trained[role] += target
    return tokens, trained


def describe_roles(tokens: list[int], trained: list[int]) -> Optional[dict[str, dict[str, float]]]:
    """{role: {tokens, trained, share}} for roles that occur."""
    return {
        ROLE_NAMES[i]: {"tokens": tokens[i], "trained": trained[i], "share": round(trained[i] / tokens[i], 4)}
        for i in range(len(ROLE_NAMES))
        if tokens[i]
    }
