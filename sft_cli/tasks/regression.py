"""Regression: one or several numeric targets from a text (or a text pair), on a sequence-classification head.

Targets are standardized for training (`data.normalize_targets`); the saved head has the statistics folded into
its last linear layer, so `model/` predicts in the data's units with nothing to undo (`transformers.pipeline`
included), and `sft_target_mean` / `sft_target_std` in its config record what was folded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.losses import regression_loss
from sft_cli.tasks.base import Batch, LossTerms
from sft_cli.tasks.classification import ClassificationTask
from sft_cli.tasks.lm_aux import aux_terms
from sft_cli.tasks.metrics import regression_metrics


def as_number(value: Any) -> Optional[float]:
    """A finite float from a JSON number or a numeric string (CSV), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


class RegressionTask(ClassificationTask):
    """Numeric targets: MSE / Huber / L1 on standardized targets; MSE, RMSE, MAE, R², Pearson, Spearman."""

    main_metric = "eval_rmse"  # in the data's units: picks the best model and is what `sft sweep` minimizes
    main_mode = "min"
    problem_type = "regression"
    label_dtype = torch.float32

    def label_columns(self) -> list[str]:
        data = self.recipe.data
        return list(data.label_fields) if data.label_fields else [data.label_field]

    def label_names_from(self, table: Any) -> list[str]:
        return self.label_columns()

    def check_labels(self, table: Any, key: str, location: Any) -> Any:
        """Every target a finite number (or null: skipped later): any other value is an error naming its row, or
        with data.skip_invalid skipped and counted."""
        bad: set[int] = set()
        for field in self.label_columns():
            if field not in table.column_names:
                continue  # require_columns names it
            for index, value in enumerate(table[field]):
                if value is not None and index not in bad and as_number(value) is None:
                    if not self.recipe.data.skip_invalid:
                        raise SftError(
                            f"{key} ({location}): row {index + 1}: '{field}' is {value!r}, not a number — fix the "
                            "row, or set data.skip_invalid: true to skip such rows"
                        )
                    bad.add(index)
        if not bad:
            return table
        self.skipped.add(key, "non-numeric target", len(bad))
        return table.select([i for i in range(len(table)) if i not in bad])

    def check_eval_labels(self, table: Any) -> None:
        """Any number is a valid eval target."""

    def encode_labels(self, rows: dict[str, list]) -> list[Any]:
        columns = [rows[field] for field in self.label_columns()]
        return [[as_number(v) for v in values] for values in zip(*columns)]

    def label_key(self) -> Any:
        return "targets"

    def fit_label_statistics(self, labels: list[Any]) -> None:
        """Mean and standard deviation of each training target (what standardization uses)."""
        values = np.asarray(labels, dtype=np.float64)
        self.raw_mean, self.raw_std = values.mean(0), values.std(0)
        if self.recipe.data.normalize_targets:
            self.target_mean = torch.tensor(self.raw_mean, dtype=torch.float32)
            self.target_std = torch.tensor(np.where(self.raw_std > 0, self.raw_std, 1.0), dtype=torch.float32)
        else:
            self.target_mean, self.target_std = torch.zeros(len(self.names)), torch.ones(len(self.names))
        self.outputs_in_data_units = False  # a model in training outputs standardized targets

    def plan_statistics(self) -> dict[str, Any]:
        return {
            "target_statistics": {
                name: {"mean": round(float(m), 6), "std": round(float(s), 6)}
                for name, m, s in zip(self.names, self.raw_mean, self.raw_std)
            }
        }

    def describe_target(self, row: dict) -> str:
        return "  -> " + ", ".join(f"{n} {v:g}" for n, v in zip(self.names, row["label"]))

    def summary_extras(self) -> dict[str, Any]:
        return {
            "target_mean": [round(float(v), 6) for v in self.target_mean],
            "target_std": [round(float(v), 6) for v in self.target_std],
        }

    def standardized(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs and targets in standardized units (what the loss compares)."""
        mean, std = self.target_mean.to(outputs.device), self.target_std.to(outputs.device)
        if self.outputs_in_data_units:
            outputs = (outputs.float() - mean) / std
        return outputs.float(), (targets.float() - mean) / std

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        outputs, targets = self.standardized(self.logits(model, batch), batch["labels"])
        summed = regression_loss(outputs, targets, self.recipe.loss.regression)
        terms = {"sup": (summed, batch["labels"].new_tensor(batch["labels"].shape[0]))}
        return {**terms, **aux_terms(self.aux, model, batch)}

    def in_data_units(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs as predictions in the data's units."""
        if self.outputs_in_data_units:
            return outputs.float()
        return outputs.float() * self.target_std.to(outputs.device) + self.target_mean.to(outputs.device)

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        preds, targets, loss = self.gathered_outputs(model, batches, gather)
        return {"loss": loss, **regression_metrics(np.asarray(targets), np.asarray(preds), self.names)}

    def eval_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss in standardized units, as training logs it."""
        return regression_loss(*self.standardized(logits, labels), self.recipe.loss.regression)

    def eval_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.in_data_units(logits)

    # -- model files and sft predict ----------------------------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        super().load_for_inference(model_dir)
        config = self.model.config
        self.names = list(getattr(config, "sft_targets", None) or self.names)
        self.target_mean = torch.tensor(getattr(config, "sft_target_mean", [0.0] * len(self.names)))
        self.target_std = torch.tensor(getattr(config, "sft_target_std", [1.0] * len(self.names)))
        self.raw_mean, self.raw_std = self.target_mean.numpy(), self.target_std.numpy()
        self.outputs_in_data_units = True  # the saved head has the statistics folded in

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model = getattr(model, "main", model)
        config = bb.unwrap(model).config
        config.sft_targets = self.names
        config.sft_target_mean = [float(v) for v in self.target_mean]
        config.sft_target_std = [float(v) for v in self.target_std]
        fold = None
        if not self.outputs_in_data_units:

            def fold(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return bb.fold_output_affine(state, len(self.names), self.target_mean, self.target_std)

        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict, transform=fold)
        self.tokenizer.save_pretrained(directory)

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        values = self.in_data_units(self.predict_logits(model, rows)).tolist()
        if len(self.names) == 1:
            return [{"prediction": round(v[0], 6)} for v in values]
        return [{"prediction": {n: round(x, 6) for n, x in zip(self.names, v)}} for v in values]

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        """No confusion matrix for numeric targets."""
