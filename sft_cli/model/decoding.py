"""Decoding for eval, `sft predict` and `sft chat`: batched, left-padded, cut at the stop token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from sft_cli.data.packing import pad_sequences


@dataclass
class DecodeSettings:
    """How to decode (greedy unless do_sample); `eval:` and `predict:` recipe sections fill it."""

    max_new_tokens: int = 32
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search only
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()  # strings that end a reply (`sft serve`'s `stop`): the text is cut before them


@dataclass
class Generated:
    """One generation: its text, token ids (without the stop token), and whether it ended with the stop token."""

    text: str
    ids: list[int]
    stopped: bool


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a reply: the (end-of-turn) EOS."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def model_context(model: torch.nn.Module) -> Optional[int]:
    """How many positions the model takes (prompt + generated), from its config; None when it does not say."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def fit_context(prompts: list[list[int]], max_new_tokens: int, context: Optional[int]) -> tuple[list[list[int]], int]:
    """Prompts and a token budget that fit the context: prompts lose their oldest tokens first; when a
    prompt leaves no room at all, generation gets half the context."""
    if not context or max(len(p) for p in prompts) + max_new_tokens <= context:
        return prompts, max_new_tokens
    new = max_new_tokens if max_new_tokens < context else max(1, context // 2)
    keep = context - new
    return [p[-keep:] for p in prompts], new


def search_settings(settings: DecodeSettings) -> dict[str, Any]:
    """The `generate` keywords for beams, repetition and sampling (beam-only ones only with beams, which
    transformers' strict generation config requires)."""
    found: dict[str, Any] = {
        "num_beams": settings.num_beams,
        "do_sample": settings.do_sample,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,  # always: 0 turns off a backbone's own (BART's 3)
    }
    if settings.num_beams > 1:
        found["length_penalty"] = settings.length_penalty
    if settings.do_sample:
        found.update(temperature=settings.temperature, top_p=settings.top_p)
    return found


def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], settings: DecodeSettings, streamer: Any = None
) -> list[Generated]:
    """Decode a batch of tokenized prompts: a decoder continues them (left padded, so every continuation starts
    at the same column); an encoder-decoder reads them as its source (right padded) and writes a new sequence."""
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    max_new_tokens = settings.max_new_tokens
    if not seq2seq:
        prompts, max_new_tokens = fit_context(prompts, max_new_tokens, model_context(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side = "right" if seq2seq else "left"
    input_ids = pad_sequences(prompts, pad, max(len(p) for p in prompts), side=side)
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, input_ids.shape[1], side=side)
    stops = stop_ids(tokenizer)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    until = {"stop_strings": list(settings.stop), "tokenizer": tokenizer} if settings.stop else {}
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=stops or None,
        pad_token_id=pad,
        streamer=streamer,
        **search_settings(settings),
        **until,
    )
    # a decoder's output repeats the prompt; an encoder-decoder's starts with the decoder start token
    generated_part = output[:, 1:] if seq2seq else output[:, input_ids.shape[1] :]
    results = []
    for generated in generated_part.tolist():
        cut = next((i for i, t in enumerate(generated) if t in stops), None)
        ids = generated if cut is None else generated[:cut]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        found = first_stop(text, settings.stop)
        if found is not None:  # a row of the batch that ended there is padded after it
            text = text[:found]
            while ids and ids[-1] == pad:
                ids = ids[:-1]
        results.append(Generated(text=text, ids=ids, stopped=cut is not None or found is not None))
    return results


def first_stop(text: str, stops: tuple[str, ...]) -> Optional[int]:
    """Where the first of the stop strings begins in the text (None: none occurs)."""
    found = [index for index in (text.find(stop) for stop in stops if stop) if index >= 0]
    return min(found) if found else None
