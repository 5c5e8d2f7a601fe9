"""Multi-label classification: any number of labels per text (sigmoid + binary cross-entropy per label).

The decision threshold is `eval.threshold`, or with `eval.tune_threshold` the one that maximizes eval micro-F1
(never lower than at `eval.threshold`); it is saved in the model's config as `sft_threshold`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.losses import summed_binary_cross_entropy
from sft_cli.tasks.base import Batch, LossTerms
from sft_cli.tasks.classification import ClassificationTask
from sft_cli.tasks.lm_aux import aux_terms
from sft_cli.tasks.metrics import best_multi_label_threshold, multi_label_metrics


class MultiLabelTask(ClassificationTask):
    """Sigmoid + BCE per label; micro/macro/samples F1, subset accuracy and Hamming loss."""

    main_metric = "eval_micro_f1"  # picks the best model and is what `sft sweep` optimizes
    main_mode = "max"
    problem_type = "multi_label_classification"
    label_dtype = torch.float32

    def label_set(self, value: Any) -> list[str]:
        """A row's label names: a list, or a string split by data.label_separator (one label without one)."""
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value if v is not None]
        separator = self.recipe.data.label_separator
        parts = str(value).split(separator) if separator else [str(value)]
        return [p.strip() for p in parts if p.strip()]

    def label_names_from(self, table: Any) -> list[str]:
        names = sorted({name for value in table[self.recipe.data.label_field] for name in self.label_set(value)})
        if not names:
            raise SftError(f"data.train: no label in {self.recipe.data.train} — every row's label list is empty")
        return names

    def check_eval_labels(self, table: Any) -> None:
        seen = {name for value in table[self.recipe.data.label_field] for name in self.label_set(value)}
        unseen = sorted(seen - set(self.label2id))
        if unseen:
            raise SftError(
                f"data.eval: label(s) {', '.join(unseen[:5])} never seen in training "
                f"(known: {', '.join(self.names[:10])})"
            )

    def encode_labels(self, rows: dict[str, list]) -> list[Any]:
        encoded = []
        for value in rows[self.recipe.data.label_field]:
            hot = [0.0] * len(self.names)
            for name in self.label_set(value):
                if name in self.label2id:
                    hot[self.label2id[name]] = 1.0
            encoded.append(hot)
        return encoded

    def label_key(self) -> Any:
        return (sorted(self.label2id.items()), self.recipe.data.label_separator)

    def fit_label_statistics(self, labels: list[Any]) -> None:
        """Per-label positive weights (`loss.class_weights`: balanced = negatives / positives, or a map)."""
        hot = np.asarray(labels, dtype=np.float64)
        self.positives = hot.sum(0)
        requested, self.pos_weight = self.recipe.loss.class_weights, None
        if requested == "balanced":
            self.pos_weight = torch.tensor(
                (len(hot) - self.positives) / np.maximum(self.positives, 1), dtype=torch.float32
            )
        elif requested is not None:
            self.pos_weight = self.weights_by_label(requested)
        self.threshold = self.recipe.eval.threshold

    def plan_statistics(self) -> dict[str, Any]:
        return {"label_distribution": {n: int(c) for n, c in zip(self.names, self.positives)}}

    def describe_target(self, row: dict) -> str:
        return "  -> labels " + (", ".join(n for n, v in zip(self.names, row["label"]) if v) or "(none)")

    def summary_extras(self) -> dict[str, Any]:
        weights = (
            None if self.pos_weight is None else {n: round(float(w), 6) for n, w in zip(self.names, self.pos_weight)}
        )
        return {"class_weights": weights, "threshold": self.threshold}

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        logits, labels = self.logits(model, batch), batch["labels"]
        weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        terms = {"sup": (summed_binary_cross_entropy(logits, labels, weight), labels.new_tensor(labels.shape[0]))}
        return {**terms, **aux_terms(self.aux, model, batch)}

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        scores, labels, loss = self.gathered_outputs(model, batches, gather)
        truth, probabilities = np.asarray(labels) > 0.5, np.asarray(scores)
        if self.recipe.eval.tune_threshold and getattr(self, "tuning", True):
            self.threshold = best_multi_label_threshold(truth, probabilities, self.recipe.eval.threshold)
        metrics = multi_label_metrics(truth, probabilities >= self.threshold, self.names)
        return {"loss": loss, **metrics, "threshold": self.threshold}

    def eval_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return summed_binary_cross_entropy(logits, labels)

    def eval_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    # -- model files and sft predict ----------------------------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        super().load_for_inference(model_dir)
        saved = getattr(self.model.config, "sft_threshold", None)
        # the tuned threshold comes with the model; an untuned recipe evaluates at its own eval.threshold
        self.threshold = saved if saved is not None and self.recipe.eval.tune_threshold else self.recipe.eval.threshold
        self.saved_threshold = saved if saved is not None else self.recipe.eval.threshold
        self.tuning, self.pos_weight = False, None

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        bb.unwrap(getattr(model, "main", model)).config.sft_threshold = float(self.threshold)
        super().save(model, directory, state_dict)

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        probabilities = self.predict_logits(model, rows).float().sigmoid().tolist()
        return [
            {
                "prediction": [n for n, p in zip(self.names, row) if p >= self.saved_threshold],
                "scores": {n: round(p, 6) for n, p in zip(self.names, row)},
            }
            for row in probabilities
        ]

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        """No confusion matrix for label sets."""
