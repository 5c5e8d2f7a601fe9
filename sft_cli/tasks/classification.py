"""Text classification: a sequence-classification head on a pretrained (or fresh) backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForSequenceClassification

from sft_cli.data.tables import cached_map, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.losses import summed_cross_entropy
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.lm_aux import AuxiliaryLM
from sft_cli.tasks.metrics import classification_metrics
from sft_cli.tasks.text import TextFieldInput, backbone_tokenizer, load_tokenizer, text_batch, tokenizer_fingerprint


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
    """Sequence classification with accuracy / macro-F1 / confusion matrix."""

    main_metric = "eval_loss"
    main_mode = "min"
    auto_class = AutoModelForSequenceClassification
    group_by_length = True

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data, spec = self.recipe.data, self.recipe.backbone
        fields = [data.text_field, data.label_field]
        if train:
            self.train_set = load_table(data.train, "data.train", self.data_cache)
            require_columns(self.train_set, fields, "data.text_field/label_field", f"data.train ({data.train})")
            self.train_set = drop_null_rows(
                self.train_set, fields, "data.train", self.skipped, [data.text_field], data.skip_invalid
            )
            names = label_names(self.train_set[data.label_field])
            if len(names) < 2:
                raise SftError(
                    f"data.train: only one label ({names[0] if names else 'none'}) in {data.train} — classification needs at least two"
                )
            resolved = bb.resolve(spec)
            self.tokenizer = backbone_tokenizer(resolved, spec)
            self.model = self.new_classifier(resolved, names)
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
            self.set_class_weights(self.train_set["label"])
        if data.eval:
            eval_raw = load_table(data.eval, "data.eval", self.data_cache)
            require_columns(eval_raw, fields, "data.text_field/label_field", f"data.eval ({data.eval})")
            eval_raw = drop_null_rows(eval_raw, fields, "data.eval", self.skipped, [data.text_field], data.skip_invalid)
            unseen = sorted({str(v) for v in eval_raw[data.label_field]} - set(self.label2id))
            if unseen:
                raise SftError(
                    f"data.eval: label(s) {', '.join(unseen[:5])} never seen in training (known: {', '.join(names[:10])})"
                )
            self.eval_set = self._tokenize(eval_raw, "data.eval")

    def new_classifier(self, resolved: bb.ResolvedBackbone, names: list[str]) -> torch.nn.Module:
        """The backbone with a fresh head for `names` (label names kept in id2label)."""
        return bb.load_model(
            self.auto_class,
            resolved,
            self.recipe.backbone,
            bb.attention_implementation(self.recipe.engine.attention, self.recipe.engine.device),
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )

    def _tokenize(self, table: Any, key: str) -> Any:
        data = self.recipe.data
        tokenizer, label2id = self.tokenizer, self.label2id

        def encode(rows: dict[str, list]) -> dict[str, list]:
            texts = ["" if t is None else str(t) for t in rows[data.text_field]]
            enc = tokenizer(texts, truncation=True, max_length=data.max_length)
            return {
                "input_ids": enc["input_ids"],
                "label": [label2id.get(str(v), -100) for v in rows[data.label_field]],
                "length": [len(ids) for ids in enc["input_ids"]],
            }

        cache_key = (
            "classification",
            data.text_field,
            data.label_field,
            data.max_length,
            tokenizer_fingerprint(tokenizer),
            sorted(label2id.items()),
        )
        return cached_map(table, encode, str(cache_key), cache=self.data_cache)

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = text_batch(rows, self.tokenizer.pad_token_id or 0, self.length_buckets)
        batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
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
            unknown = sorted(set(map(str, requested)) - set(self.names))
            if unknown:
                raise SftError(
                    f"loss.class_weights: no such label(s) {', '.join(unknown)} (labels: {', '.join(self.names[:10])})"
                )
            given = {str(k): float(v) for k, v in requested.items()}
            weights = torch.tensor([given.get(name, 1.0) for name in self.names])
        self.class_weight = weights

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
        counts = {"sup": torch.tensor(batch["labels"].shape[0]) if weights is None else weights.sum()}
        if "lm_labels" in batch:
            counts["lm"] = (batch["lm_labels"] != -100).sum()
        return counts

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Class scores for a batch (the one place that knows the model's inputs)."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        logits, labels = self.logits(model, batch), batch["labels"]
        weights = self.item_weights(labels)
        smoothing = self.recipe.loss.label_smoothing
        summed = summed_cross_entropy(logits, labels, weights, label_smoothing=smoothing)
        terms = {"sup": (summed, labels.new_tensor(labels.shape[0]) if weights is None else weights.sum())}
        if self.aux is not None and "lm_labels" in batch:
            terms["lm"] = self.aux.loss(model, batch)
        return terms

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        preds, labels, loss_sum = [], [], 0.0
        for batch in batches:
            logits = self.logits(model, batch)
            loss_sum += float(summed_cross_entropy(logits, batch["labels"]))
            preds += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        preds, labels, losses = gather(preds), gather(labels), gather([loss_sum])
        metrics = classification_metrics(labels, preds, self.names)
        metrics["loss"] = sum(losses) / max(len(labels), 1)
        return metrics

    # -- sft predict ----------------------------------------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir, self.recipe.backbone)
        self.model = bb.load_trained(self.auto_class, model_dir)
        self.names = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        self.label2id = {n: i for i, n in enumerate(self.names)}

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        field, max_length = self.recipe.data.text_field, self.recipe.data.max_length
        texts = ["" if r.get(field) is None else str(r[field]) for r in rows]
        encoded = self.tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        batch = text_batch([{"input_ids": ids} for ids in encoded], self.tokenizer.pad_token_id or 0)
        return self.label_scores(self.logits(model, _on(model, batch)), settings.top_k)

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
