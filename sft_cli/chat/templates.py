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
# Marker tokens a template writes literally: <|im_start|>, DeepSeek's <｜Assistant｜>, and <name> / </name> tags
# (<end_of_turn>, <think>, <step>) — added to a tokenizer that lacks them (`<<SYS>>` is text, not a tag).
SPECIAL_TOKEN = re.compile(r"<\|[^|\s]+\|>|<｜[^｜\s]+｜>")
TAG_TOKEN = re.compile(r"(?<![<\w])</?[A-Za-z_][\w▁]*>(?!>)")
PROBE = [{"role": "user", "content": "sft-probe-question"}, {"role": "assistant", "content": "sft-probe-answer"}]
PROBE_TWO = [
    {"role": "user", "content": "sft-probe-question"},
    {"role": "assistant", "content": "sft-probe-earlier"},
    {"role": "user", "content": "sft-probe-again"},
    {"role": "assistant", "content": "sft-probe-answer"},
]

PROBE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "sft_probe",
            "description": "A probe.",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
        },
    }
]
PROBE_CALL = [
    {"role": "user", "content": "sft-probe-question"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "probe0001",
                "type": "function",
                "function": {"name": "sft_probe", "arguments": {"query": "sft-probe-argument"}},
            }
        ],
    },
]


@dataclass
class ChatTemplate:
    """A resolved template: its text, where it came from, and the end-of-turn token that ends a reply.

    `end_of_turn` is None for a template that writes nothing after a reply (GLM-style: the next turn's header
    follows); sft then appends EOS after each trained reply.
    """

    text: str
    source: str
    end_of_turn: Optional[str]
    end_of_turn_id: Optional[int]
    added_tokens: list[str]
    stop_ids: frozenset = frozenset()  # every marker that closes a reply somewhere (final and earlier turns)


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
    """Resolve the template, add the marker tokens it writes, store it on the tokenizer, set EOS to end-of-turn."""
    text, source = template_text(requested, tokenizer, where)
    vocabulary = tokenizer.get_vocab()
    literals = _literal_text(text)
    special = [t for t in dict.fromkeys(SPECIAL_TOKEN.findall(literals)) if t not in vocabulary]
    tags = [t for t in dict.fromkeys(TAG_TOKEN.findall(literals)) if t not in vocabulary and t not in special]
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    if tags:
        tokenizer.add_tokens(tags)
    tokenizer.chat_template = text
    endings = find_end_of_turn(tokenizer, text, source)
    end_of_turn = endings[0] if endings else None
    if end_of_turn is not None and tokenizer.eos_token != end_of_turn:
        tokenizer.eos_token = end_of_turn
    eot_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    stops = frozenset(tokenizer.convert_tokens_to_ids(t) for t in endings)
    return ChatTemplate(text, source, end_of_turn, eot_id, special + tags, stops)


def _literal_text(template: str) -> str:
    """The string literals inside a Jinja template (what it writes as text), joined."""
    literals = re.findall(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", template)
    outside = re.sub(r"\{%.*?%\}|\{\{.*?\}\}|\{#.*?#\}", " ", template, flags=re.S)  # raw text between tags
    return "\n".join([a or b for a, b in literals] + [outside])


def render(tokenizer: Any, messages: list, template: str, generation_prompt: bool = False, tools: Any = None) -> str:
    """The template applied to messages, as text (exactly what inference sees before tokenization).

    Rows are rendered as given; when the template fails on them, the other spellings transformers accepts are
    tried: tool-call arguments as a dict or as JSON text, a tool call's null content as "", and `tools=[]` for
    templates that iterate `tools` unconditionally.
    """
    from sft_cli.chat.formats import InvalidConversation

    try:
        return _apply(tokenizer, messages, template, generation_prompt, tools)
    except Exception as first:
        for variant, variant_tools in _variants(messages, tools):
            try:
                return _apply(tokenizer, variant, template, generation_prompt, variant_tools)
            except Exception:
                continue
        detail = " ".join(str(first).split())[:200] or type(first).__name__
        raise InvalidConversation(f"the chat template failed to render it ({detail})") from None


def _variants(messages: list, tools: Any) -> list[tuple[list, Any]]:
    """Other spellings of the same conversation (see `render`), most faithful first."""
    swapped = _arguments_swapped(messages)
    blank = _null_content_blank(messages)
    forms = [m for m in (swapped, blank, _arguments_swapped(blank) if blank is not None else None) if m is not None]
    variants = [(form, tools) for form in forms]
    if tools is None:
        variants += [(form, []) for form in [messages, *forms]]
    return variants


def _null_content_blank(messages: list) -> Optional[list]:
    """The messages with a null `content` (a tool-call turn) as "", or None when there is none."""
    if all(m.get("content") is not None for m in messages):
        return None
    return [{**m, "content": ""} if m.get("content") is None else m for m in messages]


def _apply(tokenizer: Any, messages: list, template: str, generation_prompt: bool, tools: Any) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
    )


def _arguments_swapped(messages: list) -> Optional[list]:
    """The messages with every tool call's `arguments` in the other form (dict <-> JSON text), or None."""
    import copy
    import json

    swapped, changed = copy.deepcopy(messages), False
    for message in swapped:
        for call in message.get("tool_calls") or []:
            function = call.get("function", call) if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, dict):
                function["arguments"], changed = json.dumps(arguments, ensure_ascii=False), True
            elif isinstance(arguments, str):
                try:
                    function["arguments"], changed = json.loads(arguments), True
                except json.JSONDecodeError:
                    pass
    return swapped if changed else None


def marker_ids(tokenizer: Any) -> set[int]:
    """Token ids that can mark a turn boundary: special tokens and every added token."""
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def find_end_of_turn(tokenizer: Any, template: str, source: str) -> list[str]:
    """The marker tokens a template writes right after an assistant reply (whitespace between is allowed).

    The final turn's marker comes first (what the model learns to stop with); markers that close earlier turns
    (gpt-oss: `<|return|>` last, `<|end|>` before) and tool-call turns (`<|call|>`, `<|eom_id|>`) follow. Empty
    when nothing follows the final reply: a marker seen only after earlier replies is then the next turn's
    header (GLM), or a close the template leaves off the final turn (Qwen1.5), and EOS is appended instead.
    """
    from sft_cli.chat.formats import InvalidConversation

    markers = marker_ids(tokenizer)
    found: list[str] = []
    for probe, answers in ((PROBE, ["sft-probe-answer"]), (PROBE_TWO, ["sft-probe-answer", "sft-probe-earlier"])):
        try:
            rendered = render(tokenizer, probe, template)
        except InvalidConversation as err:
            if probe is PROBE:
                raise SftError(
                    f"data.chat_template: {source} cannot render a plain user/assistant exchange: {err}"
                ) from None
            continue  # a template that allows one exchange only
        for answer in answers:
            if answer not in rendered:
                if probe is PROBE:
                    raise SftError(f"data.chat_template: {source} does not render the assistant's content")
                continue
            after = rendered[rendered.index(answer) + len(answer) :]
            marker = _first_marker(tokenizer, after, markers)
            if marker is None and probe is PROBE:
                return []
            if marker is not None and marker not in found:
                found.append(marker)
    call = _tool_call_marker(tokenizer, template, {tokenizer.convert_tokens_to_ids(t) for t in found})
    if call is not None:
        found.append(call)
    return found


def _tool_call_marker(tokenizer: Any, template: str, known: set[int]) -> Optional[str]:
    """The special token that ends a final tool-call turn where no known marker does (`<|call|>`, `<|eom_id|>`):
    the first of the special tokens that end the rendering after the call's arguments."""
    from sft_cli.chat.formats import InvalidConversation

    try:
        rendered = render(tokenizer, PROBE_CALL, template, tools=PROBE_TOOLS)
    except InvalidConversation:
        return None
    if "sft-probe-argument" not in rendered:
        return None
    after = tokenizer(rendered[rendered.rindex("sft-probe-argument") :], add_special_tokens=False)["input_ids"]
    if known & set(after):
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    first = None
    for token in after:
        if token in special:
            first = token if first is None else first
        elif tokenizer.decode([token]).strip():
            first = None
    return tokenizer.convert_ids_to_tokens(first) if first is not None else None


def _first_marker(tokenizer: Any, text: str, markers: set[int]) -> Optional[str]:
    """The first marker token of `text` after any whitespace tokens; None when text comes first (or nothing)."""
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if token in markers:
            return tokenizer.convert_ids_to_tokens(token)
        if tokenizer.decode([token]).strip():
            return None
    return None
