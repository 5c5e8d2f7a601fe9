"""Pretraining: next-token (decoders) or masked (encoders) language modelling on packed raw text."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

from sft_cli.data.tables import DataCache, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.rundir.atomic import atomic_directory
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.lm_aux import (
    SEQ2SEQ_OBJECTIVES,
    add_sentinels,
    check_objective_tokens,
    lm_class,
    lm_inputs,
    pick_objective,
)
from sft_cli.tasks.metrics import perplexity
from sft_cli.tasks.text import (
    TextFieldInput,
    append_eos,
    backbone_tokenizer,
    document_separator,
    fit_config_to_tokenizer,
    load_tokenizer,
    pack_texts,
    train_bpe_tokenizer,
)


def build_lm(recipe: Any, objective_hint: str = "auto", cache: DataCache = DataCache()) -> tuple[Any, Any, str]:
    """(model, tokenizer, objective) for a recipe: pretrained, or fresh weights with an optional new tokenizer."""
    spec = recipe.backbone
    resolved = bb.resolve(spec)
    if recipe.tokenizer.train:
        tokenizer = _corpus_tokenizer(recipe, cache)
        if not spec.from_scratch:
            raise SftError("tokenizer.train: a new tokenizer needs fresh embeddings — set backbone.from_scratch: true")
    else:
        tokenizer = backbone_tokenizer(resolved, spec)
    config = resolved.config
    objective = pick_objective(objective_hint, config)
    if objective in SEQ2SEQ_OBJECTIVES and recipe.tokenizer.train:
        append_eos(tokenizer)  # texts end with EOS, as T5's and BART's tokenizers end them
        if objective == "span":
            add_sentinels(tokenizer)  # T5's sentinels, as special tokens of the new tokenizer
    check_objective_tokens(objective, tokenizer)
    if spec.from_scratch:
        fit_config_to_tokenizer(config, tokenizer, recipe.data.max_length)
    attention = bb.attention_implementation(recipe.engine.attention, recipe.engine.device, causal=objective == "clm")
    model = bb.load_model(lm_class(objective), resolved, spec, attention)
    return model, tokenizer, objective


def _corpus_tokenizer(recipe: Any, cache: DataCache) -> Any:
    """tokenizer.train: a tokenizer trained on data.train, every source of a mixture (read as a stream when
    data.streaming)."""
    from sft_cli.data.mixture import source_data, sources

    mix = sources(recipe.data)
    splits = [(s.key, source_data(recipe.data, s)) for s in mix] if mix else [("data.train", recipe.data)]
    corpora = [_corpus(key, data, cache) for key, data in splits]
    texts = itertools.chain.from_iterable(texts for _, texts in corpora)
    return trained_tokenizer(texts, "".join(key for key, _ in corpora), recipe.tokenizer.vocab_size, cache)


def _corpus(key: str, data: Any, cache: DataCache) -> tuple[str, Iterable[str]]:
    """(a cache key of its content, its texts) for one training source."""
    field = data.text_field
    if data.streaming:
        from sft_cli.data.files import content_hash, resolve_files
        from sft_cli.data.streaming import read_texts

        builder, files = resolve_files(data.train, key)
        texts = (text for path in files for text in read_texts(path, builder, field, data.skip_invalid))
        return content_hash(files) + field, texts
    table = load_table(data.train, key, cache)
    require_columns(table, [field], "data.text_field", f"{key} ({data.train})")
    return table._fingerprint + field, (t for t in table[field] if isinstance(t, str) and t)


def trained_tokenizer(texts: Iterable[str], corpus_key: str, vocab_size: int, cache: DataCache = DataCache()) -> Any:
    """A byte-level BPE tokenizer trained on a corpus, kept in the data cache so no later run trains it again."""
    from sft_cli.data.tables import fingerprint

    root = cache.directory
    target = Path(root) / "tokenizers" / fingerprint(corpus_key, vocab_size) if root else None
    if target is not None and (target / "tokenizer_config.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(target))
    tokenizer = train_bpe_tokenizer(texts, vocab_size)
    if target is not None:
        with atomic_directory(target) as tmp:
            tokenizer.save_pretrained(tmp)
    return tokenizer


class LanguageModelingTask(TextFieldInput, Task):
    """`sft pretrain`: loss and perplexity of a causal or masked LM."""

    main_metric = "eval_loss"
    main_mode = "min"
    eval_at_start = True

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        recipe, data = self.recipe, self.recipe.data
        if train:
            self.model, self.tokenizer, self.objective = build_lm(recipe, recipe.objective, self.data_cache)
            self.model = bb.apply_freeze(self.model, recipe.freeze)
        else:
            self._load(model_dir)
        self.auto_class = lm_class(self.objective)
        self.chunked = False
        self.seq2seq = self.objective in SEQ2SEQ_OBJECTIVES
        if self.objective == "clm":  # next-token loss without the full logits (checked against them)
            from sft_cli.model.lm_loss import with_loss

            self.model, self.chunked = with_loss(self.model, len(self.tokenizer), recipe.engine.kernels)
        elif self.seq2seq:  # the target's loss without the full logits (checked against them)
            from sft_cli.model.lm_loss import with_seq2seq_loss

            self.model, self.chunked = with_seq2seq_loss(self.model, len(self.tokenizer), recipe.engine.kernels)
        # encoder-decoder objectives end source and target with EOS: blocks leave it room within max_length
        self.block = data.max_length - 1 if self.seq2seq else data.max_length
        self.tokens_per_example = self.block
        if train and data.streaming:
            from sft_cli.data.files import resolve_files
            from sft_cli.data.mixture import Mixture, sources

            self.streaming = True
            self.stream_sources = [
                (key, resolve_files(location, key), config) for key, location, config in self.train_locations()
            ]
            mix = sources(data)
            self.mixture = Mixture.stream(mix, recipe.engine.seed) if mix else None
        elif train:
            parts = []
            for key, location, config in self.train_locations():  # each source of a mixture with its own keys
                with self.reading(config):
                    parts.append(self._blocks(location, key))
            self.train_set = self.mix_sources(parts)
        if data.eval:
            self.eval_set = self._blocks(data.eval, "data.eval")

    def _blocks(self, location: str, key: str) -> Any:
        table = load_table(location, key, self.data_cache)
        require_columns(table, [self.recipe.data.text_field], "data.text_field", f"{key} ({location})")
        field = self.recipe.data.text_field
        table = drop_null_rows(table, [field], key, self.skipped, [field], self.recipe.data.skip_invalid)
        blocks = pack_texts(
            table,
            self.tokenizer,
            self.recipe.data.text_field,
            self.block,
            self.objective,
            key,
            self.data_cache,
        )
        if len(blocks) == 0:
            raise SftError(f"{key}: {location} has no text to train on")
        return blocks

    def loss_weights(self) -> dict[str, float]:
        return {"lm": 1.0}

    def train_stream(self, rank: int, world: int, batch_size: int, skip_batches: int) -> Any:
        from sft_cli.data.streaming import BlockStream, MixedBlockStream

        tokenizer, data = self.tokenizer, self.recipe.data
        streams = [
            BlockStream(
                files,
                builder,
                config.text_field,
                encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                block=self.block,
                separator=document_separator(tokenizer),
                batch_size=batch_size,
                collate=lambda rows: self.collate(rows, train=True),
                seed=self.recipe.engine.seed,
                rank=rank,
                world=world,
                buffer=data.shuffle_buffer,
                skip_batches=skip_batches,
                skip_invalid=config.skip_invalid,
            )
            for _, (builder, files), config in self.stream_sources
        ]
        return streams[0] if self.mixture is None else MixedBlockStream(streams, self.mixture.weights())

    def collate(self, rows: list[dict], train: bool) -> Batch:
        from sft_cli.tasks.text import text_batch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = text_batch(rows, pad, self.length_buckets)
        if train:
            return lm_inputs(self.objective, batch, self.tokenizer)
        with torch.random.fork_rng():  # the same masks at every evaluation
            torch.manual_seed(0)
            return lm_inputs(self.objective, batch, self.tokenizer)

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"lm": (batch["lm_labels"] != -100).sum()}

    def tokens(self, batch: Batch) -> int:
        targets = int((batch["lm_labels"] != -100).sum()) if getattr(self, "seq2seq", False) else 0
        return int(batch["lm_attention_mask"].sum()) + targets

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        from sft_cli.model.lm_loss import causal_lm_loss, seq2seq_loss

        labels = batch["lm_labels"]
        chunked = getattr(self, "chunked", False)
        if getattr(self, "seq2seq", False):
            pair = {"input_ids": batch["lm_input_ids"], "attention_mask": batch["lm_attention_mask"], "labels": labels}
            return {"lm": (seq2seq_loss(model, chunked, pair), (labels != -100).sum())}
        summed = causal_lm_loss(
            model, chunked, batch["lm_input_ids"], labels, attention_mask=batch["lm_attention_mask"]
        )
        return {"lm": (summed, (labels != -100).sum())}

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        total, count = 0.0, 0
        for batch in batches:
            summed, n = self.loss_terms(model, batch)["lm"]
            total += float(summed)
            count += int(n)
        totals = gather([(total, count)])
        loss = sum(t for t, _ in totals) / max(sum(n for _, n in totals), 1)
        return {
            "loss": loss,
            "perplexity": perplexity(loss),
            "num_tokens": sum(n for _, n in totals),
            "objective": self.objective,
        }

    def _load(self, model_dir: str) -> None:
        config = AutoConfig.from_pretrained(model_dir)
        self.objective = pick_objective(self.recipe.objective, config)
        self.tokenizer = load_tokenizer(model_dir, self.recipe.backbone)
        self.model = bb.load_trained(lm_class(self.objective), model_dir)

    # -- sft predict: a causal LM continues each text ---------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        self._load(model_dir)
        if self.objective != "clm":
            raise SftError(
                f"a model pretrained with objective {self.objective} has no continuation to predict — use `sft eval` "
                "for its loss and perplexity, or fine-tune it (task: generation) first"
            )

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        from sft_cli.model.decoding import generate
        from sft_cli.tasks.generation_infer import decode_settings

        field, limit = self.recipe.data.text_field, self.recipe.data.max_length
        prompts = [
            self.tokenizer(str(r.get(field) or ""), add_special_tokens=False)["input_ids"][-limit:]
            or [self.tokenizer.eos_token_id]
            for r in rows
        ]
        outputs = generate(bb.unwrap(model), self.tokenizer, prompts, decode_settings(settings))
        return [{"prediction": o.text, "stopped": o.stopped, "num_tokens": len(o.ids)} for o in outputs]

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)
