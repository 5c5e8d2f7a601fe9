"""Language-modelling pieces shared by pretraining and the auxiliary LM loss of the loss mix.

`objective auto` picks masked LM for encoder architectures, next-token LM for decoders, and for encoder-decoders
T5 span corruption (T5-like models) or BART text infilling (`denoise`, the others).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from sft_cli.config.schema import Recipe
from sft_cli.data.tables import DataCache
from sft_cli.errors import SftError
from sft_cli.model.losses import shift_for_next_token, summed_cross_entropy
from sft_cli.tasks.text import pack_texts

MLM_PROBABILITY = 0.15
SEQ2SEQ_OBJECTIVES = ("span", "denoise")
T5_LIKE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")  # pretrained with span corruption and sentinels
SENTINELS = 100  # <extra_id_0> ... <extra_id_99>, as T5's tokenizers have


def pick_objective(requested: str, config: PretrainedConfig) -> str:
    """`mlm` for encoders, `clm` for decoders, `span` / `denoise` for encoder-decoders, unless the recipe says which."""
    if getattr(config, "is_encoder_decoder", False):
        if requested in ("clm", "mlm"):
            raise SftError(
                f"objective: {requested} is for encoders and decoders; an encoder-decoder ({config.model_type}) "
                "pretrains with objective: span (T5 span corruption) or denoise (BART text infilling)"
            )
        return requested if requested != "auto" else "span" if config.model_type in T5_LIKE else "denoise"
    if requested in SEQ2SEQ_OBJECTIVES:
        raise SftError(
            f"objective: {requested} pretrains encoder-decoder models (t5, bart, ...); {config.model_type} is not one "
            "— use objective: clm or mlm"
        )
    if requested != "auto":
        return requested
    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    return "mlm" if encoder else "clm"


def lm_class(objective: str) -> Any:
    """The transformers auto class for an objective."""
    if objective in SEQ2SEQ_OBJECTIVES:
        return AutoModelForSeq2SeqLM
    return AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM


def sentinel_ids(tokenizer: Any) -> list[int]:
    """The ids of T5's sentinel tokens <extra_id_0>, <extra_id_1>, ... that the tokenizer has, in order."""
    vocabulary = tokenizer.get_vocab()
    found = []
    for index in range(SENTINELS):
        token = vocabulary.get(f"<extra_id_{index}>")
        if token is None:
            break
        found.append(token)
    return found


def add_sentinels(tokenizer: Any) -> None:
    """Give a (newly trained) tokenizer T5's sentinel tokens, as special tokens."""
    missing = [f"<extra_id_{i}>" for i in range(len(sentinel_ids(tokenizer)), SENTINELS)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})


def check_objective_tokens(objective: str, tokenizer: Any) -> None:
    """The tokens an encoder-decoder objective writes into sources must exist."""
    if objective == "span" and not sentinel_ids(tokenizer):
        raise SftError(
            "objective: span writes T5's sentinel tokens <extra_id_N>, which this tokenizer lacks — use objective: "
            "denoise, or train a tokenizer (tokenizer.train: true adds them)"
        )
    if objective == "denoise" and tokenizer.mask_token_id is None:
        raise SftError(
            "objective: denoise replaces spans with the mask token, which this tokenizer lacks — use objective: span"
        )


def mask_tokens(
    input_ids: torch.Tensor, special_mask: torch.Tensor, mask_id: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15% of real tokens are predicted; of those 80% -> [MASK], 10% random, 10% kept."""
    labels = input_ids.clone()
    probability = torch.full(labels.shape, MLM_PROBABILITY)
    probability.masked_fill_(special_mask.bool(), 0.0)
    chosen = torch.bernoulli(probability).bool()
    labels[~chosen] = -100
    inputs = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(labels.shape, 0.8)).bool() & chosen
    inputs[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(labels.shape, 0.5)).bool() & chosen & ~to_mask
    inputs[to_random] = torch.randint(vocab_size, labels.shape)[to_random]
    return inputs, labels


def special_tokens_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """True at padding and at the tokenizer's special tokens (never masked)."""
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for token_id in set(tokenizer.all_special_ids):
        special |= input_ids == token_id
    return special | (attention_mask == 0)


def corrupted_pairs(objective: str, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Source and target of span corruption or text infilling for each block, each ending with EOS, padded.

    The corruption draws from a generator seeded by torch's RNG, so the engine's seed (and evaluation's fixed one)
    decides it, as it decides masked-LM masks."""
    import numpy as np

    from sft_cli.data.denoising import span_corruption, text_infilling
    from sft_cli.data.packing import pad_sequences

    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,))))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sentinels = sentinel_ids(tokenizer) if objective == "span" else []
    sources, targets = [], []
    for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        ids = [t for t, m in zip(ids, mask) if m]
        if objective == "span":
            source, target = span_corruption(ids, sentinels, rng)
        else:
            source, target = text_infilling(ids, tokenizer.mask_token_id, rng), ids
        sources.append(source + [eos])
        targets.append(target + [eos])
    inputs = pad_sequences(sources, pad)
    return {
        "lm_input_ids": inputs,
        "lm_attention_mask": pad_sequences([[1] * len(s) for s in sources], 0, inputs.shape[1]),
        "lm_labels": pad_sequences(targets, -100),
    }


def lm_inputs(objective: str, batch: dict[str, torch.Tensor], tokenizer: Any) -> dict[str, torch.Tensor]:
    """Inputs and labels for one LM pass over a batch of texts (masked, next-token, or a corrupted source and its
    target for encoder-decoders)."""
    if objective in SEQ2SEQ_OBJECTIVES:
        return corrupted_pairs(objective, batch, tokenizer)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if objective == "mlm":
        if tokenizer.mask_token_id is None:
            raise SftError("objective: mlm needs a tokenizer with a mask token — use objective: clm")
        inputs, labels = mask_tokens(
            ids, special_tokens_mask(ids, mask, tokenizer), tokenizer.mask_token_id, len(tokenizer)
        )
        return {"lm_input_ids": inputs, "lm_attention_mask": mask, "lm_labels": labels}
    labels = ids.masked_fill(mask == 0, -100)
    return {"lm_input_ids": ids, "lm_attention_mask": mask, "lm_labels": shift_for_next_token(labels)}


class WithAuxiliaryLM(nn.Module):
    """A task model plus an LM head sharing its backbone; one forward entry point (DDP-safe)."""

    def __init__(self, main: nn.Module, lm: nn.Module):
        super().__init__()
        self.main = main
        self.lm = lm

    def forward(self, aux: bool = False, **inputs: Any) -> Any:
        return self.lm(**inputs) if aux else self.main(**inputs)


def share_backbone(main: nn.Module, lm: nn.Module) -> nn.Module:
    """Point the LM model's base at the task model's base (same parameters), then retie embeddings."""
    prefix = main.base_model_prefix
    if not hasattr(lm, prefix) or not hasattr(main, prefix):
        raise SftError(f"loss.lm: cannot attach an LM head to a {main.config.model_type} backbone")
    setattr(lm, prefix, getattr(main, prefix))
    if getattr(lm.config, "tie_word_embeddings", False) and lm.get_output_embeddings() is not None:
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    return lm


class AuxiliaryLM:
    """λ × LM loss on the same input texts, for tasks whose main loss is supervised."""

    def __init__(self, objective: str, tokenizer: Any, unlabeled: Any = None, kernels: str = "auto"):
        self.objective = objective
        self.tokenizer = tokenizer
        self.unlabeled = unlabeled  # packed blocks of data.unlabeled, or None: the labeled texts themselves
        self.kernels = kernels
        self.chunked = False

    @classmethod
    def maybe(
        cls, recipe: Recipe, model: nn.Module, tokenizer: Any, cache: DataCache = DataCache()
    ) -> Optional[AuxiliaryLM]:
        """None unless `loss.lm > 0`; otherwise wraps the task model so it also has an LM head."""
        if recipe.loss.lm <= 0:
            return None
        objective = pick_objective(recipe.objective, model.config)
        unlabeled = None
        if recipe.data.unlabeled:
            from sft_cli.data.tables import SkipCounter, drop_null_rows, load_table, require_columns

            table = load_table(recipe.data.unlabeled, "data.unlabeled", cache)
            field = recipe.data.text_field
            require_columns(table, [field], "data.text_field", "data.unlabeled")
            table = drop_null_rows(table, [field], "data.unlabeled", SkipCounter(), [field], recipe.data.skip_invalid)
            unlabeled = pack_texts(
                table, tokenizer, recipe.data.text_field, recipe.data.max_length, objective, "data.unlabeled", cache
            )
        return cls(objective, tokenizer, unlabeled, recipe.engine.kernels)

    def attach(self, main: nn.Module) -> WithAuxiliaryLM:
        """Build the LM head model for `main`'s config and share the backbone."""
        try:
            lm = lm_class(self.objective).from_config(main.config)
        except ValueError:
            raise SftError(
                f"loss.lm: {main.config.model_type} has no {self.objective} head — set objective or loss.lm: 0"
            ) from None
        lm = share_backbone(main, lm)
        if self.objective == "clm":  # the next-token term without full logits, where it matches them
            from sft_cli.model.lm_loss import with_loss

            lm, self.chunked = with_loss(lm, len(self.tokenizer), self.kernels)
        return WithAuxiliaryLM(main, lm)

    def make_inputs(self, batch: dict[str, torch.Tensor], buckets: bool = False) -> dict[str, torch.Tensor]:
        """LM inputs from the batch's own texts, or from as many blocks drawn from data.unlabeled (padded like
        the task's batches: see `Task.length_buckets`)."""
        if self.unlabeled is not None:
            from sft_cli.tasks.text import text_batch

            picks = torch.randint(len(self.unlabeled), (batch["input_ids"].shape[0],)).tolist()
            batch = text_batch([self.unlabeled[i] for i in picks], self.tokenizer.pad_token_id or 0, buckets)
        return lm_inputs(self.objective, batch, self.tokenizer)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels, inputs = (
            batch["lm_labels"],
            {"input_ids": batch["lm_input_ids"], "attention_mask": batch["lm_attention_mask"]},
        )
        if self.chunked:
            return model(aux=True, labels=labels, **inputs), (labels != -100).sum()
        return summed_cross_entropy(model(aux=True, **inputs).logits, labels), (labels != -100).sum()


def aux_counts(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss mix's `lm` count (its target tokens) when the batch carries auxiliary LM inputs, else nothing."""
    return {"lm": (batch["lm_labels"] != -100).sum()} if "lm_labels" in batch else {}


def aux_terms(
    aux: Optional[AuxiliaryLM], model: nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The loss mix's `lm` term (summed loss, count) when the task trains one and the batch has its inputs."""
    return {"lm": aux.loss(model, batch)} if aux is not None and "lm_labels" in batch else {}
