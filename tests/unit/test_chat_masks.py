"""The chat loss mask: hand-computed spans on differently shaped templates, and every fail-closed check."""

import pytest
from transformers import AutoTokenizer

from sft_cli.chat.formats import InvalidConversation, check_conversation, role_names, to_messages
from sft_cli.chat.masks import ChatEncoder, MaskError
from sft_cli.chat.templates import prepare_tokenizer
from sft_cli.config.schema import DataConfig
from sft_cli.errors import SftError

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is json?"},
    {"role": "assistant", "content": "A data format."},
    {"role": "user", "content": "And csv?"},
    {"role": "assistant", "content": "Tables."},
]


@pytest.fixture
def tokenizer(tiny_decoder):
    return AutoTokenizer.from_pretrained(tiny_decoder)


def encoder(tokenizer, template, train_on="assistant", history="auto"):
    return ChatEncoder(tokenizer, prepare_tokenizer(tokenizer, template, "test"), train_on, history)


def whole(chat, messages, tools=None):
    """The one example of a conversation laid out whole."""
    (encoded,) = chat.encode(messages, tools)
    assert encoded.history == "whole"
    return encoded


def by_hand(tokenizer, pieces):
    """Token ids and mask from (text, trained) pieces tokenized one by one: the hand-computed answer."""
    ids, mask = [], []
    for text, trained in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


HAND = {
    "chatml": (
        CHAT,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is json?<|im_end|>\n", 0),
            ("<|im_start|>assistant\n", 0),
            ("A data format.<|im_end|>", 1),
            ("\n<|im_start|>user\nAnd csv?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("Tables.<|im_end|>", 1),
            ("\n", 0),
        ],
    ),
    "llama3": (
        CHAT,
        [
            ("<|endoftext|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>", 0),
            ("<|start_header_id|>user<|end_header_id|>\n\nWhat is json?<|eot_id|>", 0),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
            ("A data format.<|eot_id|>", 1),
            ("<|start_header_id|>user<|end_header_id|>\n\nAnd csv?<|eot_id|>", 0),
            ("<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
            ("Tables.<|eot_id|>", 1),
        ],
    ),
    # No system turn in the data: the template writes its default system prompt, which never trains.
    "qwen2.5": (
        CHAT[1:],
        [
            ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", 0),
            ("<|im_start|>user\nWhat is json?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("A data format.<|im_end|>", 1),
            ("\n<|im_start|>user\nAnd csv?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("Tables.<|im_end|>", 1),
            ("\n", 0),
        ],
    ),
    # No generation prompt and no system role: the reply (with its leading space) and EOS train.
    "mistral": (
        CHAT,
        [
            ("<|endoftext|>[INST] Be brief.\n\nWhat is json? [/INST]", 0),
            (" A data format.<|endoftext|>", 1),
            ("[INST] And csv? [/INST]", 0),
            (" Tables.<|endoftext|>", 1),
        ],
    ),
}


@pytest.mark.parametrize("template", sorted(HAND))
def test_masks_match_hand_computed_spans(tokenizer, template):
    messages, pieces = HAND[template]
    chat = encoder(tokenizer, template)
    encoded = whole(chat, messages)
    ids, mask = by_hand(tokenizer, pieces)
    assert encoded.input_ids == ids
    assert encoded.trained == mask
    chat.verify([(messages, None)])
    assert tokenizer.eos_token_id == chat.template.end_of_turn_id  # EOS follows the end-of-turn token


def test_train_on_last_and_all_differ_from_assistant_exactly_where_they_should(tokenizer):
    every = whole(encoder(tokenizer, "chatml", "assistant"), CHAT)
    last = whole(encoder(tokenizer, "chatml", "last"), CHAT)
    everything = whole(encoder(tokenizer, "chatml", "all"), CHAT)
    assert every.input_ids == last.input_ids == everything.input_ids
    first_reply = [i for i, (a, b) in enumerate(zip(every.trained, last.trained)) if a != b]
    assert tokenizer.decode([every.input_ids[i] for i in first_reply]) == "A data format.<|im_end|>"
    assert [i for i, t in enumerate(last.trained) if t] == [
        i for i, t in enumerate(every.trained) if t and i not in first_reply
    ]
    assert sum(last.trained) == len(tokenizer("Tables.<|im_end|>", add_special_tokens=False)["input_ids"])
    assert everything.trained == [1] * len(everything.input_ids)
    assert all(e >= a for e, a in zip(everything.trained, every.trained))


def test_special_tokens_are_added_and_eos_is_the_end_of_turn_token(tokenizer):
    before = len(tokenizer)
    template = prepare_tokenizer(tokenizer, "llama3", "test")
    assert template.added_tokens == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert len(tokenizer) == before + 3
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.chat_template == template.text
    ids = tokenizer("<|eot_id|>", add_special_tokens=False)["input_ids"]
    assert ids == [template.end_of_turn_id]  # one token, never split


def test_the_tokenizers_own_template_is_required_when_none_is_named(tokenizer):
    with pytest.raises(SftError, match="data.chat_template: chatml"):
        prepare_tokenizer(tokenizer, None, "tiny")


def test_a_jinja_file_is_a_template(tokenizer, tmp_path):
    from sft_cli.chat.templates import CHATML

    path = tmp_path / "mine.jinja"
    path.write_text(CHATML)
    assert whole(encoder(tokenizer, str(path)), CHAT).trained == whole(encoder(tokenizer, "chatml"), CHAT).trained


# -- fail closed: each check fires on a template or row built to break it ---------------------------------

REWRITES_HISTORY = (  # earlier replies are shortened (like templates that drop reasoning from history)
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and not loop.last %}{{ m.content[:3] }}{% else %}{{ m.content }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DOUBLE_BOS = "{{ bos_token }}{{ bos_token }}" + REWRITES_HISTORY.replace("and not loop.last", "and false")
REWRITES_REPLIES = REWRITES_HISTORY.replace(  # a reply's text changed on the way (the probe still passes)
    "{{ m.content[:3] }}", "{{ m.content | replace('format', 'FORMAT') }}"
).replace("and not loop.last", "")
NO_CLOSE_WITHOUT_TEXT = (  # a tool-call reply with no text is not closed by the end-of-turn token
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}"
    "{% if m.content or m.role != 'assistant' %}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NEVER_STOPS = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"


def jinja(tmp_path, text):
    path = tmp_path / "t.jinja"
    path.write_text(text)
    return str(path)


def test_a_template_that_rewrites_history_trains_per_turn(tokenizer, tmp_path):
    with pytest.raises(MaskError, match="rewrites history.*data.history: per-turn"):
        encoder(tokenizer, jinja(tmp_path, REWRITES_HISTORY), history="whole").encode(CHAT)
    segments = encoder(tokenizer, jinja(tmp_path, REWRITES_HISTORY)).encode(CHAT)  # auto
    assert [s.history for s in segments] == ["per-turn", "per-turn"] and "rewrites history" in segments[0].why
    replies = [tokenizer.decode([t for t, m in zip(s.input_ids, s.trained) if m]) for s in segments]
    assert replies == ["A data format.<|im_end|>", "Tables.<|im_end|>"]  # each reply whole, as it is generated
    second = tokenizer.decode(segments[1].input_ids)
    assert "<|im_start|>assistant\nA d<|im_end|>" in second  # its history as the template renders it at inference


def test_a_doubled_bos_fails_closed(tokenizer, tmp_path):
    with pytest.raises(MaskError, match="doubled BOS"):
        encoder(tokenizer, jinja(tmp_path, DOUBLE_BOS)).encode(CHAT)


def test_assistant_text_outside_the_mask_fails_closed(tokenizer, tmp_path):
    with pytest.raises(MaskError, match="not fully covered"):
        encoder(tokenizer, jinja(tmp_path, REWRITES_REPLIES)).encode(CHAT)
    uppercase = REWRITES_REPLIES.replace("replace('format', 'FORMAT')", "upper")
    with pytest.raises(SftError, match="does not render the assistant's content"):  # caught at start-up
        prepare_tokenizer(tokenizer, jinja(tmp_path, uppercase), "test")


def test_an_untrained_end_of_turn_token_fails_closed(tokenizer, tmp_path):
    calls = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "weather", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    with pytest.raises(MaskError, match="no end-of-turn marker \\(<\\|im_end\\|>\\) closes"):
        encoder(tokenizer, jinja(tmp_path, NO_CLOSE_WITHOUT_TEXT)).encode(calls)


def test_a_template_without_an_end_of_turn_marker_gets_eos_after_each_reply(tokenizer, tmp_path):
    chat = encoder(tokenizer, jinja(tmp_path, NEVER_STOPS))
    assert chat.template.end_of_turn is None
    segments = chat.encode(CHAT)
    assert [s.history for s in segments] == ["per-turn", "per-turn"]
    for segment, reply in zip(segments, ("A data format.", "Tables.")):
        trained = [t for t, m in zip(segment.input_ids, segment.trained) if m]
        assert trained[-1] == tokenizer.eos_token_id and reply in tokenizer.decode(trained)


def test_tokens_merging_across_a_turn_boundary_fail_closed(tokenizer, tmp_path):
    vocab = tokenizer.get_vocab()
    word = next(w for w in sorted(vocab, key=len, reverse=True) if w.isalpha() and w.islower() and len(w) >= 6)
    assert tokenizer(word, add_special_tokens=False)["input_ids"] == [vocab[word]]
    head, tail = word[:3], word[3:]
    merging = (
        "{% for m in messages %}{% if m.role == 'assistant' %}" + head + "{{ m.content }}<|im_end|>"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}" + head + "{% endif %}"
    )
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": tail + " x"}]
    with pytest.raises(MaskError, match="merge"):
        encoder(tokenizer, jinja(tmp_path, merging), history="whole").encode(messages)
    (segment,) = encoder(tokenizer, jinja(tmp_path, merging)).encode(messages)  # auto: as inference tokenizes it
    prompt = tokenizer(head, add_special_tokens=False)["input_ids"]
    assert segment.history == "per-turn" and "merge" in segment.why
    assert segment.input_ids[len(segment.input_ids) - sum(segment.trained) - len(prompt) :][: len(prompt)] == prompt


def test_generation_markers_cross_check_the_mask(tokenizer, tmp_path):
    marked = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
        "{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    chat = encoder(tokenizer, jinja(tmp_path, marked))
    chat.verify([(CHAT, None)])  # markers agree with the mask
    assert whole(chat, CHAT).trained == whole(encoder(tokenizer, "chatml"), CHAT).trained
    wrong = marked.replace(
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}",
        "{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>",
    )
    with pytest.raises(MaskError, match="generation"):
        encoder(tokenizer, jinja(tmp_path, wrong)).verify([(CHAT, None)])
    # Wider markers (SmolLM3 marks the header the generation prompt gives) agree; marking a user turn does not.
    wider = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder(tokenizer, jinja(tmp_path, wider)).verify([(CHAT, None)])
    user_marked = wider.replace("{% if m.role == 'assistant' %}", "{% if m.role in ('assistant', 'user') %}")
    with pytest.raises(MaskError, match="does not train"):
        encoder(tokenizer, jinja(tmp_path, user_marked)).verify([(CHAT, None)])


# -- data shapes --------------------------------------------------------------------------------------------


def test_sharegpt_and_alpaca_rows_equal_the_messages_rows_they_map_to(tokenizer):
    chat = encoder(tokenizer, "chatml")
    data, names = DataConfig(), role_names({})
    messages = to_messages({"messages": CHAT}, "messages", "messages", names, data)
    turns = [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]} for m in CHAT
    ]
    sharegpt = to_messages({"conversations": turns}, "sharegpt", "conversations", names, data)
    a, b = whole(chat, messages), whole(chat, sharegpt)
    assert (a.input_ids, a.trained) == (b.input_ids, b.trained)
    alpaca = to_messages(
        {"instruction": "Name a format.", "input": "for tables", "output": "csv"}, "alpaca", None, names, data
    )
    as_messages = [{"role": "user", "content": "Name a format.\n\nfor tables"}, {"role": "assistant", "content": "csv"}]
    assert alpaca == as_messages
    assert whole(chat, alpaca).trained == whole(chat, as_messages).trained


def test_data_roles_map_other_names(tokenizer):
    turns = [{"from": "customer", "value": "hi"}, {"from": "agent", "value": "hello"}]
    names = role_names({"customer": "user", "agent": "assistant"})
    assert [m["role"] for m in to_messages({"c": turns}, "sharegpt", "c", names, DataConfig())] == ["user", "assistant"]
    with pytest.raises(SftError, match="data.roles.agent"):
        role_names({"agent": "robot"})


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "must alternate"),
        ([{"role": "user", "content": "a"}], "no assistant turn"),
        ([{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}], "unknown role"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "not a string"),
        ([{"role": "assistant", "content": "a"}], "'assistant' first"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}],
            "no tool call",
        ),
    ],
)
def test_invalid_conversations_say_what_is_wrong(messages, problem):
    with pytest.raises(InvalidConversation, match=problem):
        check_conversation(messages)


def test_tool_calls_train_like_assistant_text_and_tool_results_like_user_text(tokenizer):
    calls = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "Sunny."},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    encoded = whole(encoder(tokenizer, "chatml"), calls, tools)
    trained = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.trained) if m])
    assert '"name": "weather"' in trained and "Sunny." in trained
    assert "sunny, 21C" not in trained and "Tools:" not in trained
    full = tokenizer.decode(encoded.input_ids)
    assert "Tools:" in full and "sunny, 21C" in full


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("reply", ["end", "im_end", "eot_id", "|>"])
def test_a_reply_that_is_part_of_a_marker_still_ends_at_the_marker(tokenizer, template, reply):
    """A reply like `end` also appears inside `<|im_end|>`: the reply is its own text, not the marker's."""
    messages = [{"role": "user", "content": "What does `re.Match.end` do, without the module?"}]
    messages.append({"role": "assistant", "content": reply})
    chat = encoder(tokenizer, template)
    encoded = whole(chat, messages)
    trained = tokenizer.decode([t for t, m in zip(encoded.input_ids, encoded.trained) if m])
    assert trained.startswith(reply) and trained.endswith(chat.template.end_of_turn)
    chat.verify([(messages, None)])
