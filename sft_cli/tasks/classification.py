"""Text classification: a sequence-classification head on a pretrained (or fresh) backbone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForSequenceClassification

from sft_cli.data.tables import cached_map, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.losses import summed_cross_entropy
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.lm_aux import AuxiliaryLM, aux_counts, aux_terms
from sft_cli.tasks.metrics import classification_metrics
from sft_cli.tasks.text import TextFieldInput, load_tokenizer, new_text_model, text_batch, tokenizer_fingerprint


def _on(model: torch.nn.Module, batch: Batch) -> Batch:
    """A CPU batch moved to the model's device."""
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def label_names(values: list[Any]) -> list[str]:
    """Sorted distinct label names (numerically when every label is a number)."""
    distinct = {str(v) for v in values if v is not None}
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return sorted(distinct)


class ClassificationTask(TextFieldInput, Task):
    """Sequence classification (one text, or a pair) with accuracy / macro-F1 / confusion matrix.

    Regression and multi-label classification reuse it, overriding the label hooks (how labels are read, encoded,
    scored) — the data, tokenization, freezing, loss mix and prediction plumbing are the same.
    """

    main_metric = "eval_loss"
    main_mode = "min"
    auto_class = AutoModelForSequenceClassification
    group_by_length = True
    problem_type: Optional[str] = None  # the model config's problem_type (regression, multi_label_classification)
    label_dtype = torch.long

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        if train:
            self.train_set = self.read_split(data.train, "data.train")
            names = self.label_names_from(self.train_set)
            self.tokenizer, self.model = new_text_model(self.recipe, self.auto_class, **self.head_settings(names))
        else:
            self.load_for_inference(model_dir)
            names = self.names
        self.names = names
        self.label2id = {n: i for i, n in enumerate(names)}
        self.aux = AuxiliaryLM.maybe(self.recipe, self.model, self.tokenizer, self.data_cache) if train else None
        if train:
            self.model = bb.apply_freeze(self.model, self.recipe.freeze)
        if self.aux is not None:
            self.model = self.aux.attach(self.model)
        if self.train_set is not None:
            self.train_set = self._tokenize(self.train_set, "data.train")
            self.fit_label_statistics(self.train_set["label"])
        if data.eval:
            eval_raw = self.read_split(data.eval, "data.eval")
            self.check_eval_labels(eval_raw)
            self.eval_set = self._tokenize(eval_raw, "data.eval")

    # -- the label hooks (regression and multi-label override these) ------------------------------

    def input_fields(self) -> list[tuple[str, str]]:
        pair = self.recipe.data.text_pair_field
        return super().input_fields() + ([(pair, "data.text_pair_field")] if pair else [])

    def label_columns(self) -> list[str]:
        """The columns that hold the label(s)."""
        return [self.recipe.data.label_field]

    def label_key_name(self) -> str:
        """The recipe key that names the label column(s)."""
        return "data.label_fields" if self.recipe.data.label_fields else "data.label_field"

    def label_names_from(self, table: Any) -> list[str]:
        """The label names (model outputs) learned from the training split."""
        names = label_names(table[self.recipe.data.label_field])
        if len(names) < 2:
            raise SftError(
                f"data.train: only one label ({names[0] if names else 'none'}) in {self.recipe.data.train} — "
                f"{self.recipe.task} needs at least two"
            )
        return names

    def check_labels(self, table: Any, key: str, location: Any) -> Any:
        """Refuse (or with data.skip_invalid skip) rows whose label cannot be used, naming the row; the table."""
        return table

    def check_eval_labels(self, table: Any) -> None:
        """Refuse eval labels the model never saw in training."""
        unseen = sorted({str(v) for v in table[self.recipe.data.label_field]} - set(self.label2id))
        if unseen:
            raise SftError(
                f"data.eval: label(s) {', '.join(unseen[:5])} never seen in training "
                f"(known: {', '.join(self.names[:10])})"
            )

    def encode_labels(self, rows: dict[str, list]) -> list[Any]:
        """The `label` column of a tokenized batch of rows."""
        return [self.label2id.get(str(v), -100) for v in rows[self.recipe.data.label_field]]

    def label_key(self) -> Any:
        """What the encoded labels depend on (part of the data cache key)."""
        return sorted(self.label2id.items())

    def fit_label_statistics(self, labels: list[Any]) -> None:
        """Statistics of the training labels the loss uses (class weights)."""
        self.set_class_weights(labels)

    def plan_statistics(self) -> dict[str, Any]:
        counts = Counter(self.train_set["label"])
        return {"label_distribution": {self.names[i]: counts.get(i, 0) for i in range(len(self.names))}}

    def describe_target(self, row: dict) -> str:
        return f"  -> label {self.names[row['label']]}"

    # -- data ---------------------------------------------------------------------------------------

    def read_split(self, location: Any, key: str) -> Any:
        """A split's rows with every needed column, labels checked, null rows counted and left out."""
        texts = [field for field, _ in self.input_fields()]
        fields = texts + self.label_columns()
        table = load_table(location, key, self.data_cache)
        for field, what in self.input_fields() + [(name, self.label_key_name()) for name in self.label_columns()]:
            require_columns(table, [field], what, f"{key} ({location})")
        table = self.check_labels(table, key, location)
        return drop_null_rows(table, fields, key, self.skipped, texts, self.recipe.data.skip_invalid)

    def encode_texts(self, rows: dict[str, list]) -> dict[str, list]:
        """`input_ids` of each row's text, or of its text pair (the longer text truncated first, with the
        tokenizer's `token_type_ids` when it has segments)."""
        data = self.recipe.data
        texts = ["" if t is None else str(t) for t in rows[data.text_field]]
        if not data.text_pair_field:
            return {"input_ids": self.tokenizer(texts, truncation=True, max_length=data.max_length)["input_ids"]}
        pairs = ["" if t is None else str(t) for t in rows[data.text_pair_field]]
        encoded = self.tokenizer(texts, pairs, truncation="longest_first", max_length=data.max_length)
        return {key: encoded[key] for key in ("input_ids", "token_type_ids") if key in encoded}

    def new_classifier(self, resolved: bb.ResolvedBackbone, names: list[str]) -> torch.nn.Module:
        """The resolved backbone with a fresh head for `names` (image classification resolves its own)."""
        engine = self.recipe.engine
        attention = bb.attention_implementation(engine.attention, engine.device, causal=False)
        return bb.load_model(self.auto_class, resolved, self.recipe.backbone, attention, **self.head_settings(names))

    def head_settings(self, names: list[str]) -> dict[str, Any]:
        """The new head's config: one output per name (kept in id2label) and the task's problem_type."""
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
            **({"problem_type": self.problem_type} if self.problem_type else {}),
        }

    def _tokenize(self, table: Any, key: str) -> Any:
        data = self.recipe.data

        def encode(rows: dict[str, list]) -> dict[str, list]:
            encoded = self.encode_texts(rows)
            lengths = [len(ids) for ids in encoded["input_ids"]]
            return {**encoded, "label": self.encode_labels(rows), "length": lengths}

        cache_key = (
            self.recipe.task,
            data.text_field,
            data.text_pair_field,
            self.label_columns(),
            data.max_length,
            tokenizer_fingerprint(self.tokenizer),
            self.label_key(),
        )
        return cached_map(table, encode, str(cache_key), cache=self.data_cache)

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = text_batch(rows, self.tokenizer.pad_token_id or 0, self.length_buckets)
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=self.label_dtype)
        if train and self.aux is not None:
            batch.update(self.aux.make_inputs(batch, self.length_buckets))
        return batch

    def set_class_weights(self, label_ids: list[int]) -> None:
        """`loss.class_weights`: balanced (n / (classes * count)), a {label: weight} map, or none."""
        requested, self.class_weight = self.recipe.loss.class_weights, None
        if requested is None:
            return
        if requested == "balanced":
            counts = torch.bincount(torch.tensor(label_ids), minlength=len(self.names)).float()
            weights = len(label_ids) / (len(self.names) * counts.clamp(min=1))
        else:
            weights = self.weights_by_label(requested)
        self.class_weight = weights

    def weights_by_label(self, requested: dict) -> torch.Tensor:
        """A `loss.class_weights` map as one weight per label (1.0 where unnamed); an unknown label is an error."""
        unknown = sorted(set(map(str, requested)) - set(self.names))
        if unknown:
            raise SftError(
                f"loss.class_weights: no such label(s) {', '.join(unknown)} (labels: {', '.join(self.names[:10])})"
            )
        given = {str(k): float(v) for k, v in requested.items()}
        return torch.tensor([given.get(name, 1.0) for name in self.names])

    def item_weights(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Each example's class weight (None without class weights)."""
        weight = getattr(self, "class_weight", None)
        return None if weight is None else weight.to(labels.device)[labels.clamp(min=0)]

    def summary_extras(self) -> dict[str, Any]:
        weight = getattr(self, "class_weight", None)
        weights = None if weight is None else {n: round(float(w), 6) for n, w in zip(self.names, weight)}
        return {"class_weights": weights, "label_smoothing": self.recipe.loss.label_smoothing}

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        weights = self.item_weights(batch["labels"])
        return {
            "sup": torch.tensor(batch["labels"].shape[0]) if weights is None else weights.sum(),
            **aux_counts(batch),
        }

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Class scores for a batch (the one place that knows the model's inputs)."""
        segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        logits, labels = self.logits(model, batch), batch["labels"]
        weights = self.item_weights(labels)
        smoothing = self.recipe.loss.label_smoothing
        summed = summed_cross_entropy(logits, labels, weights, label_smoothing=smoothing)
        terms = {"sup": (summed, labels.new_tensor(labels.shape[0]) if weights is None else weights.sum())}
        return {**terms, **aux_terms(self.aux, model, batch)}

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        preds, labels, loss = self.gathered_outputs(model, batches, gather)
        return {**classification_metrics(labels, preds, self.names), "loss": loss}

    def gathered_outputs(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any
    ) -> tuple[list, list, float]:
        """Every eval example's output (`eval_outputs`) and label, gathered from all processes, and the mean loss."""
        outputs, labels, loss_sum = [], [], 0.0
        for batch in batches:
            logits = self.logits(model, batch)
            loss_sum += float(self.eval_loss(logits, batch["labels"]))
            outputs += self.eval_outputs(logits).tolist()
            labels += batch["labels"].tolist()
        outputs, labels, losses = gather(outputs), gather(labels), gather([loss_sum])
        return outputs, labels, sum(losses) / max(len(labels), 1)

    def eval_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed, unweighted eval loss of a batch."""
        return summed_cross_entropy(logits, labels)

    def eval_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What the metrics compare with the labels: the predicted class."""
        return logits.argmax(-1)

    # -- sft predict ----------------------------------------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir, self.recipe.backbone)
        self.model = bb.load_trained(self.auto_class, model_dir)
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.label2id = {n: i for i, n in enumerate(self.names)}

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        return self.label_scores(self.predict_logits(model, rows), settings.top_k)

    def predict_logits(self, model: torch.nn.Module, rows: list[dict]) -> torch.Tensor:
        """The model's outputs for `sft predict` rows (text, or text pair)."""
        columns = {field: [r.get(field) for r in rows] for field, _ in self.input_fields()}
        encoded = self.encode_texts(columns)
        batch = text_batch(
            [dict(zip(encoded, values)) for values in zip(*encoded.values())], self.tokenizer.pad_token_id or 0
        )
        return self.logits(model, _on(model, batch))

    def label_scores(self, logits: torch.Tensor, top_k: int) -> list[dict[str, Any]]:
        """Per row: the predicted label name, its probability, and the top-k label -> probability."""
        probabilities = logits.float().softmax(-1)
        top = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
        out = []
        for values, indices in zip(top.values.tolist(), top.indices.tolist()):
            scores = {self.names[i]: round(v, 6) for v, i in zip(values, indices)}
            out.append({"prediction": self.names[indices[0]], "score": round(values[0], 6), "scores": scores})
        return out

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model = getattr(model, "main", model)
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        from sft_cli.ui.plots import confusion_matrix_png

        confusion_matrix_png(metrics["confusion_matrix"], metrics["labels"], directory / "confusion_matrix.png")
