"""Token classification (NER, POS): one tag per word, on a token-classification head.

Words are tokenized as pre-split words; the tag trains on each word's first sub-token (`data.label_all_subtokens`:
on all of them). A sentence longer than `data.max_length` becomes overlapping windows (`data.stride` tokens
shared); predictions are stitched back per word from the window where the word sits farthest from an edge, so
every word gets a tag and counts in the metrics. Metrics are seqeval's (entity level, exact span and type).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForTokenClassification

from sft_cli.data.packing import pad_sequences
from sft_cli.data.tables import cached_map, drop_null_rows, load_table, require_columns, require_columns_named
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.losses import summed_cross_entropy
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.lm_aux import AuxiliaryLM, aux_counts, aux_terms
from sft_cli.tasks.metrics import token_classification_metrics
from sft_cli.tasks.text import load_tokenizer, new_text_model, require_fast_tokenizer, text_batch, tokenizer_fingerprint


def window_overlap(tokenizer: Any, max_length: int, stride: int) -> int:
    """`data.stride`, capped at half a window so that consecutive windows always advance."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if room < 2:
        raise SftError(f"data.max_length: {max_length} leaves no room for words beside the special tokens")
    return min(stride, room // 2)


def entities(tags: list[str], words: list[str]) -> list[dict[str, Any]]:
    """Entity spans of a tag sequence (seqeval's reading of IOB/IOBES), as word offsets with end exclusive."""
    from seqeval.metrics.sequence_labeling import get_entities

    return [
        {"type": kind, "start": start, "end": end + 1, "text": " ".join(words[start : end + 1])}
        for kind, start, end in get_entities(list(tags))
    ]


def tags_as_names(table: Any, field: str) -> Any:
    """Integer tags of a hub dataset (a list of ClassLabel, as conll2003's ner_tags) as their names."""
    import datasets

    inner = getattr(table.features.get(field), "feature", None)
    if not isinstance(inner, datasets.ClassLabel):
        return table
    named = [None if tags is None else [inner.names[t] for t in tags] for tags in table[field]]
    return table.remove_columns(field).add_column(field, named)


class TokenClassificationTask(Task):
    """Per-word tags with seqeval precision / recall / F1, word accuracy and per-type scores."""

    main_metric = "eval_f1"  # entity F1 picks the best model and is what `sft sweep` optimizes
    main_mode = "max"
    auto_class = AutoModelForTokenClassification
    group_by_length = True

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        if train:
            raw_train = self.read_split(data.train, "data.train")
            self.names = sorted({tag for tags in raw_train[data.tags_field] for tag in tags})
            self.tokenizer, self.model = new_text_model(
                self.recipe,
                self.auto_class,
                num_labels=len(self.names),
                id2label=dict(enumerate(self.names)),
                label2id={n: i for i, n in enumerate(self.names)},
            )
        else:
            self.load_for_inference(model_dir)
        require_fast_tokenizer(self.tokenizer, "token classification", "word ids per sub-token")
        self.label2id = {n: i for i, n in enumerate(self.names)}
        self.aux = AuxiliaryLM.maybe(self.recipe, self.model, self.tokenizer, self.data_cache) if train else None
        if train:
            self.model = bb.apply_freeze(self.model, self.recipe.freeze)
            self.tag_counts = self.count_entities(raw_train[data.tags_field])
            self.train_set = self.windows(raw_train, "data.train")
        if self.aux is not None:
            self.model = self.aux.attach(self.model)
        if data.eval:
            raw_eval = self.read_split(data.eval, "data.eval")
            unseen = sorted({t for tags in raw_eval[data.tags_field] for t in tags} - set(self.label2id))
            if unseen:
                raise SftError(
                    f"data.eval: tag(s) {', '.join(unseen[:5])} never seen in training "
                    f"(known: {', '.join(self.names[:10])})"
                )
            self.eval_words = [len(tokens) for tokens in raw_eval[data.tokens_field]]
            self.eval_tags = list(raw_eval[data.tags_field])
            self.eval_set = self.windows(raw_eval, "data.eval")

    # -- data ---------------------------------------------------------------------------------------

    def read_split(self, location: Any, key: str) -> Any:
        """A split's sentences: words and tags checked row by row (naming file and row), null rows counted."""
        data = self.recipe.data
        table = load_table(location, key, self.data_cache)
        require_columns(table, [data.tokens_field], "data.tokens_field", f"{key} ({location})")
        require_columns(table, [data.tags_field], "data.tags_field", f"{key} ({location})")
        table = tags_as_names(table, data.tags_field)
        bad = []
        for index, (words, tags) in enumerate(zip(table[data.tokens_field], table[data.tags_field])):
            if words is None or tags is None:
                continue  # counted as null rows below
            problem = self.sentence_problem(words, tags)
            if problem and not data.skip_invalid:
                raise SftError(f"{key} ({location}): row {index + 1}: {problem}")
            if problem:
                bad.append(index)
        if bad:
            self.skipped.add(key, "invalid sentence", len(bad))
            table = table.select(sorted(set(range(len(table))) - set(bad)))
        return drop_null_rows(table, [data.tokens_field, data.tags_field], key, self.skipped)

    def sentence_problem(self, words: Any, tags: Any) -> Optional[str]:
        """Why a row cannot train (and what to do), or None."""
        data = self.recipe.data
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            return f"'{data.tokens_field}' must be a list of words (strings); got {type(words).__name__}"
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            return f"'{data.tags_field}' must be a list of tags (strings); got {type(tags).__name__}"
        if not words:
            return f"empty '{data.tokens_field}' list — remove the row"
        if len(words) != len(tags):
            return f"{len(words)} words but {len(tags)} tags — give exactly one tag per word"
        return None

    def encode(
        self, sentences: list[list[str]], tags: Optional[list[list[str]]], indices: Optional[list[int]] = None
    ) -> dict[str, list]:
        """Overlapping windows of pre-split sentences: ids, per-position labels and the word each position starts."""
        data, tokenizer = self.recipe.data, self.tokenizer
        encoded = tokenizer(
            sentences,
            is_split_into_words=True,
            truncation=True,
            max_length=data.max_length,
            stride=window_overlap(tokenizer, data.max_length, data.stride),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )
        out: dict[str, list] = {"input_ids": [], "word_index": [], "example": [], "length": []}
        if tags is not None:
            out["labels"] = []
        for window, ids in enumerate(encoded["input_ids"]):
            source = encoded["overflow_to_sample_mapping"][window]
            word_ids, offsets = encoded.word_ids(window), encoded["offset_mapping"][window]
            starts = [w if w is not None and o[0] == 0 else -1 for w, o in zip(word_ids, offsets)]
            out["input_ids"].append(ids)
            out["word_index"].append(starts)
            out["example"].append(indices[source] if indices is not None else source)
            out["length"].append(len(ids))
            if tags is not None:
                out["labels"].append(self.position_labels(tags[source], word_ids, starts))
        return out

    def position_labels(self, tags: list[str], word_ids: list[Optional[int]], starts: list[int]) -> list[int]:
        """Each position's tag id: a word's first sub-token (or, with label_all_subtokens, all), -100 elsewhere."""
        labels = []
        for word, start in zip(word_ids, starts):
            if start >= 0:
                labels.append(self.label2id.get(tags[start], -100))
            elif word is not None and self.recipe.data.label_all_subtokens:
                tag = tags[word]
                inside = "I-" + tag[2:] if tag.startswith("B-") else tag  # as HF's run_ner: B-X continues as I-X
                labels.append(self.label2id.get(inside, self.label2id.get(tag, -100)))
            else:
                labels.append(-100)
        return labels

    def windows(self, table: Any, key: str) -> Any:
        data = self.recipe.data

        def encode(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
            return self.encode(rows[data.tokens_field], rows[data.tags_field], indices)

        cache_key = (
            "token-classification",
            data.tokens_field,
            data.tags_field,
            data.max_length,
            data.stride,
            data.label_all_subtokens,
            tokenizer_fingerprint(self.tokenizer),
            sorted(self.label2id.items()),
        )
        return cached_map(table, encode, str(cache_key), with_indices=True, cache=self.data_cache)

    def count_entities(self, all_tags: list[list[str]]) -> dict[str, int]:
        """Entities per type in the training data (what `sft plan` shows)."""
        counts: dict[str, int] = {}
        for tags in all_tags:
            for entity in entities(tags, [""] * len(tags)):
                counts[entity["type"]] = counts.get(entity["type"], 0) + 1
        return dict(sorted(counts.items()))

    def plan_statistics(self) -> dict[str, Any]:
        sentences = len(set(self.train_set["example"]))
        return {
            "entity_types": self.tag_counts,
            "windows": {"sentences": sentences, "split_into_windows": len(self.train_set) - sentences},
        }

    def describe_target(self, row: dict) -> str:
        tags = [self.names[t] for t in row["labels"] if t != -100]
        return "  -> tags " + " ".join(tags)

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = text_batch(rows, self.tokenizer.pad_token_id or 0, self.length_buckets)
        width = batch["input_ids"].shape[1]
        batch["labels"] = pad_sequences([r["labels"] for r in rows], -100, width)
        if not train:
            batch["word_index"] = pad_sequences([r["word_index"] for r in rows], -1, width)
            batch["example"] = torch.tensor([r["example"] for r in rows])
        if train and self.aux is not None:
            batch.update(self.aux.make_inputs(batch, self.length_buckets))
        return batch

    # -- loss and metrics ---------------------------------------------------------------------------

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sup": (batch["labels"] != -100).sum(), **aux_counts(batch)}

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        labels = batch["labels"]
        terms = {"sup": (summed_cross_entropy(self.logits(model, batch), labels), (labels != -100).sum())}
        return {**terms, **aux_terms(self.aux, model, batch)}

    def word_votes(self, logits: torch.Tensor, batch: Batch) -> list[tuple[int, int, int, int]]:
        """(example, word, predicted tag id, distance from the window's nearer edge) for every word start."""
        predicted = logits.argmax(-1).tolist()
        lengths = batch["attention_mask"].sum(-1).tolist()
        votes = []
        for row, (starts, example) in enumerate(zip(batch["word_index"].tolist(), batch["example"].tolist())):
            for position, word in enumerate(starts):
                if word >= 0:
                    votes.append((example, word, predicted[row][position], min(position, lengths[row] - 1 - position)))
        return votes

    def stitch(self, votes: list[tuple[int, int, int, int]], sizes: dict[int, int]) -> dict[int, list[str]]:
        """Per example, one tag per word: from the window where the word is farthest from an edge (`O`, or the
        first tag, for a word the tokenizer gave no sub-token)."""
        best: dict[tuple[int, int], tuple[int, int]] = {}
        for example, word, tag, centrality in votes:
            if best.get((example, word), (-1, -1))[0] < centrality:
                best[(example, word)] = (centrality, tag)
        fallback = self.label2id.get("O", 0)
        return {
            example: [self.names[best.get((example, w), (0, fallback))[1]] for w in range(size)]
            for example, size in sizes.items()
        }

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        votes, loss_sum, count = [], 0.0, 0
        for batch in batches:
            logits = self.logits(model, batch)
            loss_sum += float(summed_cross_entropy(logits, batch["labels"]))
            count += int((batch["labels"] != -100).sum())
            votes += self.word_votes(logits, batch)
        votes, losses, counts = gather(votes), gather([loss_sum]), gather([count])
        predicted = self.stitch([tuple(v) for v in votes], dict(enumerate(self.eval_words)))
        metrics = token_classification_metrics(self.eval_tags, [predicted[i] for i in range(len(self.eval_tags))])
        return {"loss": sum(losses) / max(sum(counts), 1), **metrics}

    # -- model files and sft predict ----------------------------------------------------------------

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model = getattr(model, "main", model)
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)

    def load_for_inference(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir, self.recipe.backbone)
        self.model = bb.load_trained(self.auto_class, model_dir)
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.label2id = {n: i for i, n in enumerate(self.names)}
        require_fast_tokenizer(self.tokenizer, "token classification", "word ids per sub-token")

    def check_input(self, columns: list[str]) -> None:
        require_columns_named(columns, [self.recipe.data.tokens_field], "data.tokens_field", "--input")

    def input_words(self, row: dict) -> list[str]:
        """A row's words: its list, or its text split on whitespace."""
        value = row.get(self.recipe.data.tokens_field)
        return value.split() if isinstance(value, str) else [str(w) for w in value or []]

    def predict_length(self, row: dict) -> int:
        return len(self.input_words(row))

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        field = self.recipe.data.tokens_field
        problems: list[Optional[str]] = []
        for number, row in enumerate(rows, first):
            value = row.get(field)
            if value is not None and not isinstance(value, (str, list)):
                if not self.recipe.data.skip_invalid:
                    raise SftError(
                        f"--input row {number}: '{field}' is {type(value).__name__}, not a list of words or a text "
                        "— fix the row, or set data.skip_invalid: true to skip such rows"
                    )
                problems.append(f"non-word {field}")
            else:
                problems.append(None if self.input_words(row) else f"null {field}")
        return problems

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        sentences = [self.input_words(r) for r in rows]
        encoded = self.encode(sentences, None)
        windows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        device = next(model.parameters()).device
        votes = []
        for begin in range(0, len(windows), settings.batch_size):
            chunk = windows[begin : begin + settings.batch_size]
            batch = text_batch(chunk, self.tokenizer.pad_token_id or 0)
            width = batch["input_ids"].shape[1]
            batch["word_index"] = pad_sequences([w["word_index"] for w in chunk], -1, width)
            batch["example"] = torch.tensor([w["example"] for w in chunk])
            votes += self.word_votes(self.logits(model, {k: v.to(device) for k, v in batch.items()}), batch)
        tags = self.stitch(votes, {i: len(words) for i, words in enumerate(sentences)})
        return [{"prediction": tags[i], "entities": entities(tags[i], words)} for i, words in enumerate(sentences)]
