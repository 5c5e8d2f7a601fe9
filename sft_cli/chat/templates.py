"""Chat templates: built-in ones of different shapes, `.jinja` files, or the tokenizer's own.

Resolving a template also prepares the tokenizer: the special tokens the template writes are added (the
caller resizes the embeddings), the template is stored on the tokenizer (so `model/` carries it), and EOS
becomes the template's end-of-turn token, found by rendering a probe conversation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sft_cli.errors import SftError

# Tool calls are rendered by each template in its own way; tool results are a turn of role `tool`.
CHATML = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% endif %}{{ 'Tools:\\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' }}{{ (call['function'] if call['function'] is defined else call) | tojson }}{{ '</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2.5's shape: ChatML that writes a default system prompt when the conversation has none.
QWEN25 = CHATML.replace(
    "{%- for message in messages %}",
    "{%- if messages[0]['role'] != 'system' and not tools %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}",
    1,
)
# Llama 3's shape: BOS, role headers, content trimmed, <|eot_id|> closes every turn.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] %}{{- message['content'] | trim }}{%- endif %}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{{- (call['function'] if call['function'] is defined else call) | tojson }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral's shape: no system role (folded into the first user turn), no generation prompt, EOS ends a reply.
MISTRAL = (
    "{{- bos_token }}"
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system + '\\n\\n' if system and loop.index0 <= 1 else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + (message['content'] or '') + eos_token }}"
    "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS] ' + message['content'] + ' [/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
BUILTIN = {"chatml": CHATML, "qwen2.5": QWEN25, "llama3": LLAMA3, "mistral": MISTRAL}
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
PROBE = [{"role": "user", "content": "sft-probe-question"}, {"role": "assistant", "content": "sft-probe-answer"}]


@dataclass
class ChatTemplate:
    """A resolved template: its text, where it came from, and the end-of-turn token that ends a reply."""

    text: str
    source: str
    end_of_turn: str
    end_of_turn_id: int
    added_tokens: list[str]


def template_text(requested: Optional[str], tokenizer: Any, where: str) -> tuple[str, str]:
    """(template, source) for `data.chat_template`: a built-in name, a .jinja path, or null (the tokenizer's)."""
    if requested is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise SftError(
                f"data.chat_template: the tokenizer of {where} has no chat template and the data is "
                f"conversational — set data.chat_template: chatml (or {', '.join(b for b in BUILTIN if b != 'chatml')}, "
                "or a .jinja file)"
            )
        return own, "the tokenizer's own"
    if requested in BUILTIN:
        return BUILTIN[requested], f"built-in '{requested}'"
    path = Path(requested).expanduser()
    if path.suffix in (".jinja", ".j2", ".jinja2"):
        if not path.is_file():
            raise SftError(f"data.chat_template: file not found: {path}")
        return path.read_text(encoding="utf-8"), str(path)
    raise SftError(
        f"data.chat_template: '{requested}' is neither a built-in ({', '.join(BUILTIN)}) nor a .jinja file path"
    )


def prepare_tokenizer(tokenizer: Any, requested: Optional[str], where: str) -> ChatTemplate:
    """Resolve the template, add the special tokens it writes, store it on the tokenizer, set EOS to end-of-turn."""
    text, source = template_text(requested, tokenizer, where)
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(SPECIAL_TOKEN.findall(text)) if t not in vocabulary]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = text
    end_of_turn = find_end_of_turn(tokenizer, text, source)
    if tokenizer.eos_token != end_of_turn:
        tokenizer.eos_token = end_of_turn
    return ChatTemplate(text, source, end_of_turn, tokenizer.convert_tokens_to_ids(end_of_turn), missing)


def render(tokenizer: Any, messages: list, template: str, generation_prompt: bool = False, tools: Any = None) -> str:
    """The template applied to messages, as text (exactly what inference sees before tokenization)."""
    from sft_cli.chat.formats import InvalidConversation

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as err:  # raise_exception() or any error inside the template: this conversation's problem
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise InvalidConversation(f"the chat template failed to render it ({detail})") from None


def find_end_of_turn(tokenizer: Any, template: str, source: str) -> str:
    """The special token the template writes right after an assistant reply (what the model learns to stop with)."""
    from sft_cli.chat.formats import InvalidConversation

    try:
        rendered = render(tokenizer, PROBE, template)
    except InvalidConversation as err:
        raise SftError(f"data.chat_template: {source} cannot render a plain user/assistant exchange: {err}") from None
    answer = PROBE[1]["content"]
    if answer not in rendered:
        raise SftError(f"data.chat_template: {source} does not render the assistant's content")
    after = rendered[rendered.rindex(answer) + len(answer) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    if not ids or ids[0] not in special:
        shown = repr(after[:20]) if after else "nothing"
        raise SftError(
            f"data.chat_template: {source} writes {shown} after an assistant reply, not an end-of-turn special token "
            "— the model could never learn to stop; use a template that closes turns (e.g. chatml)"
        )
    return tokenizer.convert_ids_to_tokens(ids[0])
