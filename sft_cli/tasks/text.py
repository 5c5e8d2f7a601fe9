"""Pieces shared by the text tasks: tokenizer loading and padding collation."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from sft_cli.backbone import ResolvedBackbone
from sft_cli.errors import SftError
from sft_cli.schema import BackboneConfig

PAD_MULTIPLE = 8  # tensor-core / vector friendly shapes at almost no padding cost
_BUCKETS = {"on": False}  # engine.compile: lengths in powers of two, so a compiled graph is reused, not rebuilt


def set_length_buckets(enabled: bool) -> None:
    """Pad batch lengths to powers of two (>= 16) instead of multiples of 8 (set by the engine for compile)."""
    _BUCKETS["on"] = enabled


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


class TextFieldInput:
    """`sft predict` input of the tasks that read one text column (data.text_field)."""

    recipe: Any

    def check_input(self, columns: list[str]) -> None:
        from sft_cli.data import require_columns_named

        require_columns_named(columns, [self.recipe.data.text_field], "data.text_field", "--input")

    def predict_length(self, row: dict) -> int:
        return len(str(row.get(self.recipe.data.text_field) or ""))

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        field = self.recipe.data.text_field
        return [
            input_problem(row.get(field), field, number, self.recipe.data.skip_invalid)
            for number, row in enumerate(rows, first)
        ]


def input_problem(value: Any, field: str, number: int, skip_invalid: bool) -> Optional[str]:
    """Why an input row's text is skipped (`null text`), or None; a non-string text is an error naming the row
    (skipped with data.skip_invalid) — the rule training applies to its data."""
    from sft_cli.data import text_problem

    problem = text_problem(value, field)
    if problem and problem.startswith("non-string") and not skip_invalid:
        raise SftError(
            f"--input row {number}: '{field}' is {type(value).__name__}, not text — fix the row, or set "
            "data.skip_invalid: true to skip such rows"
        )
    return problem


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a tokenizer does (vocabulary, merges, added tokens, normalizer, template): keys caches."""
    from sft_cli.data import fingerprint

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return fingerprint(body, getattr(tokenizer, "chat_template", None), tokenizer.model_max_length)


def pad_multiple(length: int, multiple: int = PAD_MULTIPLE) -> int:
    """Round a length up to a multiple (or, with length buckets, to the next power of two)."""
    if _BUCKETS["on"]:
        return max(16, 1 << max(0, length - 1).bit_length())
    return ((length + multiple - 1) // multiple) * multiple


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_value: int, length: Optional[int] = None, side: str = "right"
) -> torch.Tensor:
    """A [batch, length] LongTensor of right- (or left-) padded sequences."""
    length = length or pad_multiple(max(len(s) for s in sequences))
    out = torch.full((len(sequences), length), pad_value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        seq = list(seq)[:length]
        if side == "right":
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        elif seq:
            out[row, -len(seq) :] = torch.tensor(seq, dtype=torch.long)
    return out


def text_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask for rows holding `input_ids`, padded to the longest (multiple of 8)."""
    ids = [r["input_ids"] for r in rows]
    input_ids = pad_sequences(ids, pad_id)
    mask = pad_sequences([[1] * len(s) for s in ids], 0, input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": mask}


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from EOS (so EOS stays a learned target); True if added."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return True
