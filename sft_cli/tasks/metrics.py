"""Metric computation for the tasks (scikit-learn, sacrebleu, rouge-score)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [i for i in labels if support[i] > 0] or labels
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class": {
            names[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in labels
        },
        "labels": list(names),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "num_examples": int(len(y_true)),
    }


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match, corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    exact = float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)])) if references else 0.0
    # effective_order: short answers (a name, a label) have no 4-grams; standard BLEU would give 0 for all.
    bleu = BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score if references else 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"exact_match": exact, "bleu": float(bleu), "rouge_l": float(np.mean(rouge)) if rouge else 0.0}


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model still gives a JSON number."""
    return float(math.exp(min(loss, 50.0)))
