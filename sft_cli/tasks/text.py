"""Pieces shared by the text tasks: tokenizer loading and padding collation."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sft_cli.config.schema import BackboneConfig, Recipe
from sft_cli.data.packing import pad_sequences
from sft_cli.data.tables import DataCache, cached_map
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.backbone import ResolvedBackbone


def load_tokenizer(location: str, spec: BackboneConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that ships with a model directory, alias or hub id."""
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=spec.trust_remote_code)
    except Exception as err:  # tokenizers raises plain Exceptions on a truncated tokenizer.json
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise SftError(f"backbone.name: no usable tokenizer in {location}: {first}") from None


def backbone_tokenizer(backbone: ResolvedBackbone, spec: BackboneConfig) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer; a `from_scratch` model is resized to its vocabulary."""
    if not backbone.location:
        raise SftError(
            "backbone: an `arch`-only model has no tokenizer — set backbone.name to a model directory or hub id, "
            "or pretrain one first (`sft pretrain` with tokenizer.train: true) and set backbone.name to its model/"
        )
    tokenizer = load_tokenizer(backbone.location, spec)
    if spec.from_scratch and hasattr(backbone.config, "vocab_size"):
        backbone.config.vocab_size = len(tokenizer)
    return tokenizer


def new_text_model(recipe: Recipe, auto_class: Any, **head: Any) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """The backbone's tokenizer and an `auto_class` model on it with a new head (`head`: its config settings)."""
    resolved = bb.resolve(recipe.backbone)
    tokenizer = backbone_tokenizer(resolved, recipe.backbone)
    attention = bb.attention_implementation(recipe.engine.attention, recipe.engine.device, causal=False)
    return tokenizer, bb.load_model(auto_class, resolved, recipe.backbone, attention, **head)


def require_fast_tokenizer(tokenizer: Any, task: str, why: str) -> None:
    """Word ids and character offsets come only from fast (Rust) tokenizers."""
    if not getattr(tokenizer, "is_fast", False):
        raise SftError(f"backbone.name: {task} needs a fast tokenizer ({why})")


class TextFieldInput:
    """`sft predict` input of the tasks that read text columns (data.text_field, and a pair's second text)."""

    recipe: Any

    def input_fields(self) -> list[tuple[str, str]]:
        """The text columns an input row needs, each with the recipe key that names it."""
        return [(self.recipe.data.text_field, "data.text_field")]

    def check_input(self, columns: list[str]) -> None:
        from sft_cli.data.tables import require_columns_named

        for field, key in self.input_fields():
            require_columns_named(columns, [field], key, "--input")

    def predict_length(self, row: dict) -> int:
        return sum(len(str(row.get(field) or "")) for field, _ in self.input_fields())

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        skip = self.recipe.data.skip_invalid
        problems = []
        for number, row in enumerate(rows, first):
            found = [input_problem(row.get(field), field, number, skip) for field, _ in self.input_fields()]
            problems.append(next((p for p in found if p), None))
        return problems


def input_problem(value: Any, field: str, number: int, skip_invalid: bool) -> Optional[str]:
    """Why an input row's text is skipped (`null text`), or None; a non-string text is an error naming the row
    (skipped with data.skip_invalid) — the rule training applies to its data."""
    from sft_cli.data.tables import text_problem

    problem = text_problem(value, field)
    if problem and problem.startswith("non-string") and not skip_invalid:
        raise SftError(
            f"--input row {number}: '{field}' is {type(value).__name__}, not text — fix the row, or set "
            "data.skip_invalid: true to skip such rows"
        )
    return problem


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a tokenizer does (vocabulary, merges, added tokens, normalizer, template): keys caches."""
    from sft_cli.data.tables import fingerprint

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint(body, getattr(tokenizer, "chat_template", None), tokenizer.model_max_length)


def text_batch(rows: list[dict[str, Any]], pad_id: int, buckets: bool = False) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask (+ token_type_ids when the rows have them) for rows holding `input_ids`, padded
    to the longest (multiple of 8, or a power of two with length `buckets`)."""
    ids = [r["input_ids"] for r in rows]
    input_ids = pad_sequences(ids, pad_id, buckets=buckets)
    batch = {
        "input_ids": input_ids,
        "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, input_ids.shape[1]),
    }
    if rows and "token_type_ids" in rows[0]:
        batch["token_type_ids"] = pad_sequences([r["token_type_ids"] for r in rows], 0, input_ids.shape[1])
    return batch


SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "bos_token": "<|endoftext|>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on `texts` (the `tokenizers` library), with EOS, pad and mask."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(SPECIAL_TOKENS.values()))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def append_eos(tokenizer: Any) -> None:
    """Make a trained tokenizer end every encoded text with EOS (`add_special_tokens`), as T5's and BART's do, so
    scripts that tokenize sources and targets the usual way train an encoder-decoder that learns to stop."""
    from tokenizers import processors

    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tokenizer.eos_token_id)]
    )


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS (so EOS stays a learned target); True if added."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True


def fit_config_to_tokenizer(config: Any, tokenizer: Any, max_length: int) -> None:
    """Vocabulary size, special-token ids and context length of a fresh model follow its tokenizer (an
    encoder-decoder's decoder keeps its convention: starting at the pad token like T5, or at EOS like BART)."""
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)  # T5Config has none: T5 starts at pad
        starts_at_pad = start is None or start == config.pad_token_id
        config.decoder_start_token_id = tokenizer.pad_token_id if starts_at_pad else tokenizer.eos_token_id
        if getattr(config, "forced_eos_token_id", None) is not None:
            config.forced_eos_token_id = tokenizer.eos_token_id
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            setattr(config, name, value)
    for name in ("n_positions", "max_position_embeddings"):
        if hasattr(config, name) and getattr(config, name) < max_length:
            setattr(config, name, max_length)


def pack_texts(
    table: Any, tokenizer: Any, field: str, block: int, objective: str, key: str, cache: DataCache = DataCache()
) -> Any:
    """Tokenize once, join documents with EOS (SEP for encoders), cut into full blocks of `block` tokens."""
    separator = document_separator(tokenizer)

    def encode(rows: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for text in rows[field]:
            if text:
                stream += tokenizer(str(text), add_special_tokens=False)["input_ids"] + [separator]
        usable = (len(stream) // block) * block or len(stream)
        return {"input_ids": [stream[i : i + block] for i in range(0, usable, block)]}

    key = str(("pack", field, block, objective, tokenizer_fingerprint(tokenizer)))
    return cached_map(table, encode, key, cache=cache)


def document_separator(tokenizer: Any) -> int:
    """The token between packed documents: EOS (decoders) or SEP (encoders)."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if separator is None:
        raise SftError("backbone: the tokenizer has neither an EOS nor a SEP token to separate documents")
    return separator
