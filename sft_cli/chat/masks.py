"""The loss mask of a conversation, computed for any Jinja template and checked, failing closed.

A reply is trained exactly as the model will produce it at inference: after the template's generation prompt
for the history (`render(history, add_generation_prompt=True)`, tokenized on its own), the tokens of the reply
as the template renders it when it is the newest turn, through the end-of-turn marker (whitespace before the
marker included: the model must produce it too). Two ways to lay that out (`data.history`):

- `whole`: the conversation is rendered and tokenized once and every reply is trained in place. Used when, for
  each reply, the generation prompt is a prefix of the whole, the reply as newest turn appears verbatim after
  it, and the prompt's own tokens are a token prefix of the whole — the prefix property.
- `per-turn`: one segment per reply: its generation prompt (untrained) + the reply (trained). Exact for any
  template, including those that rewrite history (Qwen3 and DeepSeek-R1 drop earlier `<think>` blocks; gpt-oss
  ends the final turn with `<|return|>`, earlier ones with `<|end|>`). A template that writes no marker after a
  reply gets EOS appended to each reply.

`auto` picks `whole` for a conversation when the prefix property holds, `per-turn` otherwise. Failures only
refuse what touches trained tokens (text after the final turn, or merges inside untrained text, do not count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from sft_cli.chat.formats import InvalidConversation
from sft_cli.chat.replies import MaskError, called_functions, own_text_end, realigned_completion, visible_content
from sft_cli.chat.templates import ChatTemplate, render
from sft_cli.config.schema import HISTORY, TRAIN_ON

__all__ = ["MaskError", "ChatEncoder", "EncodedConversation", "HISTORY", "TRAIN_ON", "role_token_counts"]

ROLE_IDS = {"system": 0, "user": 1, "assistant": 2, "tool": 3}
TEMPLATE_ROLE = 4  # tokens the template writes outside any turn (none in the usual templates)
ROLE_NAMES = [*ROLE_IDS, "template"]


@dataclass
class EncodedConversation:
    """Token ids, which tokens are training targets (1) or not (0), and each token's role id."""

    input_ids: list[int]
    trained: list[int]
    roles: list[int]
    history: str = "whole"  # how it was laid out: whole | per-turn
    why: str = ""  # for per-turn under `auto`: why whole did not hold


@dataclass
class Reply:
    """One assistant turn: where its generation prompt ends in the whole text, and its text as newest turn."""

    index: int
    prompt: str
    completion: str  # the reply as the template renders it when newest, through its end-of-turn marker
    completion_ids: list[int] = field(default_factory=list)
    appended_eos: bool = False
    realigned: bool = False  # the generation prompt is not a prefix of the history: trained after it (per-turn)


class ChatEncoder:
    """Turns validated messages into token ids and a loss mask for one template and `loss.train_on`."""

    def __init__(self, tokenizer: Any, template: ChatTemplate, train_on: str = "assistant", history: str = "auto"):
        self.tokenizer = tokenizer
        self.template = template
        self.train_on = train_on
        self.history = history
        self.bos_id = tokenizer.bos_token_id
        self.markers = _special_text(tokenizer)
        self.reply_markers = _special_text(tokenizer, template.end_of_turn)  # where a reply's text cannot be

    def render(self, messages: list, generation_prompt: bool = False, tools: Any = None) -> str:
        return render(self.tokenizer, messages, self.template.text, generation_prompt, tools)

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list, tools: Any = None) -> list[int]:
        """The history with the generation prompt, tokenized as inference tokenizes it."""
        return self.tokens(self.render(messages, True, tools))

    def check_text(self, messages: list, tools: Any = None) -> None:
        """Refuse a conversation whose text spells a special token (`<|im_end|>` typed in a reply): tokenized,
        it would become that token and forge a turn boundary, so it is an invalid row, not training data."""
        if self.markers is None:
            return
        for index, message in enumerate(messages, 1):
            texts = [message.get(key) or "" for key in ("content", "reasoning_content", "thinking")]
            texts += [json.dumps(c, ensure_ascii=False) for c in message.get("tool_calls") or []]
            for text in texts:
                found = self.markers.search(text)
                if found:
                    raise InvalidConversation(
                        f"turn {index} contains the special token {found.group(0)} as text (it would be read as that "
                        "token, forging the conversation's structure)"
                    )

    # -- the replies ------------------------------------------------------------------------------------

    def replies(self, messages: list, tools: Any = None) -> list[Reply]:
        """Every trained assistant turn: its generation prompt and its completion through the end-of-turn marker."""
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last":
            indices = indices[-1:]
        replies = []
        for index in indices:
            prompt = self.render(messages[:index], True, tools) if index else ""
            newest = self.render(messages[: index + 1], tools=tools)
            if newest.startswith(prompt):
                reply = Reply(index, prompt, newest[len(prompt) :])
            else:
                reply = Reply(index, prompt, realigned_completion(prompt, newest, messages, index), realigned=True)
            self._close(reply, messages[index])
            replies.append(reply)
        return replies

    def _close(self, reply: Reply, message: dict) -> None:
        """Cut the completion after the first end-of-turn marker that follows the reply's own text (EOS appended
        when the template writes none)."""
        encoding = self.tokenizer(reply.completion, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
        stops = self.template.stop_ids or ({self.template.end_of_turn_id} - {None})
        own = own_text_end(reply.completion, message, self.reply_markers)
        end = next((i for i, token in enumerate(ids) if token in stops and offsets[i][0] >= own), None)
        if end is None:
            if self.template.end_of_turn is not None:
                raise MaskError(
                    f"turn {reply.index + 1}: no end-of-turn marker ({self.template.end_of_turn}) closes the assistant "
                    "reply, so the model would not learn to stop"
                )
            ids = ids + [self.tokenizer.eos_token_id]
            reply.appended_eos = True
        else:
            reply.completion = reply.completion[: offsets[end][1]]  # text after the marker: not ours
            ids = ids[: end + 1]
        reply.completion_ids = ids
        visible, trained_text = visible_content(message), self.tokenizer.decode(ids, skip_special_tokens=False)
        if visible and visible not in trained_text:
            raise MaskError(f"turn {reply.index + 1}: the assistant's text is not fully covered by the trained tokens")
        for name in called_functions(message):
            if name not in trained_text:
                raise MaskError(
                    f"turn {reply.index + 1}: the template does not render this turn's tool call '{name}', so the "
                    "model would learn an empty reply"
                )

    # -- encoding ---------------------------------------------------------------------------------------

    def encode(self, messages: list, tools: Any = None) -> list[EncodedConversation]:
        """The conversation's training segments (one `whole`, or one per reply); MaskError when none is sound."""
        self.check_text(messages, tools)
        if self.train_on == "all":
            ids = self.tokens(self.render(messages, tools=tools))
            self._check_bos(ids)
            return [EncodedConversation(ids, [1] * len(ids), self._roles(messages, tools, ids), "whole")]
        replies = self.replies(messages, tools)
        if not replies:
            raise MaskError("the conversation has no trained token")
        why = ""
        if self.history != "per-turn":
            try:
                return [self._whole(messages, tools, replies)]
            except MaskError as err:
                if self.history == "whole":
                    raise MaskError(f"{err} — set data.history: per-turn (or auto)") from None
                why = str(err)
        return [self._segment(messages, tools, reply, why) for reply in replies]

    def _whole(self, messages: list, tools: Any, replies: list[Reply]) -> EncodedConversation:
        """All replies trained in place in one rendering; MaskError when the prefix property fails for a reply."""
        if any(r.realigned for r in replies):
            raise MaskError("the template's generation prompt differs from how it renders the history before a reply")
        if any(r.appended_eos for r in replies):
            raise MaskError("the template writes no end-of-turn marker after a reply (EOS is appended per reply)")
        full = self.render(messages, tools=tools)
        ids = self.tokens(full)
        self._check_bos(ids)
        trained = [0] * len(ids)
        for reply in replies:
            start = len(reply.prompt)
            if not full.startswith(reply.prompt):
                raise MaskError(
                    f"turn {reply.index + 1}: its generation prompt is not a prefix of the whole conversation"
                )
            if full[start : start + len(reply.completion)] != reply.completion:
                raise MaskError(
                    f"turn {reply.index + 1}: the template renders this reply differently once later turns follow "
                    "(it rewrites history)"
                )
            prompt_ids = self.tokens(reply.prompt)
            if ids[: len(prompt_ids)] != prompt_ids:
                raise MaskError(f"turn {reply.index + 1}: tokens merge across the end of its generation prompt")
            end = len(prompt_ids) + len(reply.completion_ids)
            if ids[len(prompt_ids) : end] != reply.completion_ids:
                raise MaskError(f"turn {reply.index + 1}: the reply's tokens differ inside the whole conversation")
            trained[len(prompt_ids) : end] = [1] * (end - len(prompt_ids))
        return EncodedConversation(ids, trained, self._roles(messages, tools, ids), "whole")

    def _segment(self, messages: list, tools: Any, reply: Reply, why: str) -> EncodedConversation:
        """One reply after its own generation prompt: exactly what inference tokenizes, then what it generates."""
        prompt_ids = self.tokens(reply.prompt)
        self._check_bos(prompt_ids + reply.completion_ids)
        ids = prompt_ids + reply.completion_ids
        roles = self._roles(messages[: reply.index], tools, prompt_ids, prompt=True)
        roles += [ROLE_IDS["assistant"]] * len(reply.completion_ids)
        trained = [0] * len(prompt_ids) + [1] * len(reply.completion_ids)
        return EncodedConversation(ids, trained, roles, "per-turn", why)

    def _check_bos(self, ids: list[int]) -> None:
        if self.bos_id is not None and ids[:2] == [self.bos_id, self.bos_id]:
            raise MaskError(
                "the conversation starts with a doubled BOS token (the template and tokenizer both add one)"
            )

    def _roles(self, messages: list, tools: Any, ids: list[int], prompt: bool = False) -> list[int]:
        """Each token's role, from the renderings of growing prefixes (best effort: statistics, not the mask)."""
        text = self.render(messages, prompt, tools) if messages else ""
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) != len(ids):
            return [TEMPLATE_ROLE] * len(ids)
        roles = [TEMPLATE_ROLE] * len(ids)
        start = 0
        for index, message in enumerate(messages):
            try:
                end = len(self.render(messages[: index + 1], tools=tools))
            except InvalidConversation:
                continue
            end = min(end, len(text))
            first = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(ids))
            last = next((i for i, (s, _) in enumerate(offsets) if s >= end), len(ids))
            roles[first:last] = [ROLE_IDS[message["role"]]] * (last - first)
            start = max(start, end)
        if prompt and messages:
            first = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(ids))
            roles[first:] = [ROLE_IDS["assistant"]] * (len(ids) - first)  # the generation prompt's header
        return roles

    # -- start-up checks --------------------------------------------------------------------------------

    def verify(self, conversations: list[tuple[list, Any]]) -> None:
        """Encode real rows at start-up (every check above), and cross-check `{% generation %}` markers."""
        for messages, tools in conversations:
            segments = self.encode(messages, tools)
            if (
                segments[0].history == "whole"
                and self.train_on == "assistant"
                and _has_generation_markers(self.template.text)
            ):
                self._cross_check(messages, tools, segments[0])

    def _cross_check(self, messages: list, tools: Any, ours: EncodedConversation) -> None:
        """The template's `{% generation %}` spans must hold every token the mask trains (whitespace aside), and
        mark nothing else but a reply's header that its generation prompt gives the model (SmolLM3 marks
        `<|im_start|>assistant`) or text after a reply's end-of-turn marker within its turn: wider, never other."""
        try:
            marked = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template.text,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )["assistant_masks"]
        except Exception:  # noqa: BLE001 — the row renders only in another spelling (see templates.render)
            return
        offsets = self.tokenizer(
            self.render(messages, tools=tools), add_special_tokens=False, return_offsets_mapping=True
        )["offset_mapping"]
        if not (len(marked) == len(ours.trained) == len(offsets)):
            return  # the markers cover a different rendering; the mask was proven above

        def shown(i: int) -> bool:
            return bool(self.tokenizer.decode([ours.input_ids[i]]).strip())

        unmarked = [i for i, (a, b) in enumerate(zip(marked, ours.trained)) if b and not a and shown(i)]
        if unmarked:
            raise MaskError(f"the template's {{% generation %}} markers leave out trained tokens {unmarked[:5]}")
        allowed = []
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for index, (_, end) in zip(replies, _runs(ours.trained)):
            history = self.render(messages[:index], tools=tools) if index else ""
            prompt = self.render(messages[:index], True, tools) if index else ""
            if prompt.startswith(history):
                allowed.append((len(history), len(prompt)))
            allowed.append((offsets[end - 1][1], len(self.render(messages[: index + 1], tools=tools))))
        extra = [
            i
            for i, (a, b) in enumerate(zip(marked, ours.trained))
            if a and not b and shown(i) and not any(lo <= offsets[i][0] and offsets[i][1] <= hi for lo, hi in allowed)
        ]
        if extra:
            raise MaskError(
                f"the template's {{% generation %}} markers mark tokens {extra[:5]}, which the mask does not train"
            )


def _runs(flags: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    runs, start = [], None
    for index, flag in enumerate([*flags, 0]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _special_text(tokenizer: Any, *more: Optional[str]) -> Optional[re.Pattern]:
    """A pattern matching the text of the tokenizer's special tokens (not plain added tokens like `<think>`), and
    of `more` markers."""
    texts = set(tokenizer.all_special_tokens) | {text for text in more if text}
    texts |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    texts.discard("")
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def _has_generation_markers(template: str) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def role_token_counts(encoded: EncodedConversation) -> tuple[list[int], list[int]]:
    """(tokens, trained tokens) per role id, for the plan's shares and summary.json."""
    tokens, trained = [0] * len(ROLE_NAMES), [0] * len(ROLE_NAMES)
    for role, target in zip(encoded.roles, encoded.trained):
        tokens[role] += 1
        trained[role] += target
    return tokens, trained
