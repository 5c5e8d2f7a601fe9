"""Metric computation for the tasks (scikit-learn, sacrebleu, rouge-score)."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

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


def _regression_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    mse = float(mean_squared_error(y_true, y_pred))
    constant = len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    return {
        "mse": mse,
        "rmse": math.sqrt(mse),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": float(r2_score(y_true, y_pred)) if len(y_true) > 1 else 0.0,
        # a constant prediction has no correlation: 0, not NaN (JSON has no NaN)
        "pearson": 0.0 if constant else float(pearsonr(y_true, y_pred)[0]),
        "spearman": 0.0 if constant else float(spearmanr(y_true, y_pred)[0]),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """MSE, RMSE, MAE, R², Pearson and Spearman (scikit-learn, scipy), each averaged over the targets, with every
    target's own under `per_target`."""
    y_true, y_pred = y_true.reshape(len(y_true), -1), y_pred.reshape(len(y_pred), -1)
    per_target = {name: _regression_scores(y_true[:, i], y_pred[:, i]) for i, name in enumerate(names)}
    metrics: dict[str, Any] = {
        key: float(np.mean([s[key] for s in per_target.values()])) for key in per_target[names[0]]
    }
    metrics["per_target"] = per_target
    metrics["num_examples"] = int(len(y_true))
    return metrics


def multi_label_metrics(truth: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Micro/macro/samples F1, subset accuracy, Hamming loss and per-label scores of 0/1 label matrices."""
    from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support

    truth, predicted = truth.astype(int).reshape(len(truth), -1), predicted.astype(int).reshape(len(truth), -1)
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, average=None, zero_division=0)
    return {
        "micro_f1": float(f1_score(truth, predicted, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        "samples_f1": float(f1_score(truth, predicted, average="samples", zero_division=0)),
        "subset_accuracy": float(accuracy_score(truth, predicted)),
        "hamming_loss": float(hamming_loss(truth, predicted)),
        "per_label": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(names, precision, recall, f1, support)
        },
        "num_examples": int(len(truth)),
    }


def best_multi_label_threshold(truth: np.ndarray, probabilities: np.ndarray, default: float) -> float:
    """The threshold in (0, 1) with the highest micro-F1 (ties and a flat curve keep `default`, so tuning never
    lowers micro-F1 below the default's)."""
    from sklearn.metrics import f1_score

    def micro_f1(threshold: float) -> float:
        return float(f1_score(truth, probabilities >= threshold, average="micro", zero_division=0))

    best, best_f1 = default, micro_f1(default)
    for threshold in np.round(np.arange(0.02, 0.99, 0.02), 2):
        score = micro_f1(float(threshold))
        if score > best_f1:
            best, best_f1 = float(threshold), score
    return best


def token_classification_metrics(truth: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 (exact span and type) and word accuracy, as seqeval computes them."""
    from seqeval.metrics import accuracy_score, classification_report, f1_score, precision_score, recall_score

    report = classification_report(truth, predicted, output_dict=True, zero_division=0)
    per_type = {
        kind: {
            key: (int(value) if key == "support" else float(value))
            for key, value in scores.items()
            if key != "f1-score"
        }
        | {"f1": float(scores["f1-score"])}
        for kind, scores in report.items()
        if not kind.endswith(" avg")
    }
    return {
        "precision": float(precision_score(truth, predicted, zero_division=0)),
        "recall": float(recall_score(truth, predicted, zero_division=0)),
        "f1": float(f1_score(truth, predicted, zero_division=0)),
        "accuracy": float(accuracy_score(truth, predicted)),
        "per_type": per_type,
        "num_examples": len(truth),
    }


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles (a, an, the), single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 of one prediction against one gold answer (both empty: 1)."""
    from collections import Counter

    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) against the best of the gold answers; no gold answer = only "" is right."""
    golds = list(golds) or [""]
    exact = max(float(normalize_answer(prediction) == normalize_answer(g)) for g in golds)
    return exact, max(answer_f1(prediction, g) for g in golds)


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Exact match and F1 (SQuAD v2 rules, as fractions), F1 on answerable questions and, when some questions
    have no answer, the share of those answered with ""."""
    scores = [squad_scores(p, g) for p, g in zip(predictions, golds)]
    answerable = [f for (_, f), g in zip(scores, golds) if g]
    unanswerable = [not p for p, g in zip(predictions, golds) if not g]
    metrics: dict[str, Any] = {
        "exact_match": float(np.mean([e for e, _ in scores])) if scores else 0.0,
        "f1": float(np.mean([f for _, f in scores])) if scores else 0.0,
        "has_answer_f1": float(np.mean(answerable)) if answerable else 0.0,
    }
    if unanswerable:
        metrics["no_answer_accuracy"] = float(np.mean(unanswerable))
    metrics["num_examples"] = len(scores)
    return metrics


def best_null_threshold(
    found: Sequence[dict[str, Any]], margins: Sequence[float], golds: Sequence[Sequence[str]], default: float
) -> float:
    """The no-answer threshold with the highest eval F1: a question is answered when its margin (no-answer score
    minus best span score) is <= the threshold. Ties keep `default`, so tuning never lowers F1."""
    answered = [squad_scores(f["text"], g)[1] for f, g in zip(found, golds)]
    unanswered = [float(not g) for g in golds]

    def total(threshold: float) -> float:
        return sum(a if m <= threshold else u for a, m, u in zip(answered, margins, unanswered))

    finite = sorted({m for m in margins if m != float("inf")})
    best, best_total = default, total(default)
    for threshold in ([finite[0] - 1.0] if finite else []) + finite:
        score = total(threshold)
        if score > best_total + 1e-12:
            best, best_total = float(threshold), score
    return best


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact match, corpus BLEU and chrF++ (sacrebleu), mean ROUGE-L F1 (rouge-score), mean METEOR (NLTK)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    if not references:
        return {"exact_match": 0.0, "bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0, "meteor": 0.0, "meteor_variant": ""}
    predictions, references = list(predictions), list(references)
    exact = float(np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]))
    # effective_order: short answers (a name, a label) have no 4-grams; standard BLEU would give 0 for all.
    bleu = BLEU(effective_order=True).corpus_score(predictions, [references]).score
    chrf = CHRF(word_order=2).corpus_score(predictions, [references]).score  # chrF++ (character + word bigrams)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    meteor, variant = meteor_scores(predictions, references)
    return {
        "exact_match": exact,
        "bleu": float(bleu),
        "chrf": float(chrf),
        "rouge_l": float(np.mean(rouge)),
        "meteor": meteor,
        "meteor_variant": variant,
    }


class _NoSynonyms:
    """A WordNet stand-in with no synsets: METEOR's synonym stage then matches nothing."""

    @staticmethod
    def synsets(_word: str) -> list:
        return []


def meteor_scores(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """Mean sentence METEOR (NLTK; lower-cased word and punctuation tokens) and which stages ran: exact, Porter
    stem, and WordNet synonyms when the WordNet data is installed (`nltk.download('wordnet')`), else none."""
    import re

    from nltk.translate.meteor_score import meteor_score

    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        synonyms, variant = wordnet, "exact+stem+wordnet"
    except LookupError:  # no WordNet data here: the synonym stage has nothing to match
        synonyms, variant = _NoSynonyms(), "exact+stem (no WordNet data)"

    def words(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)

    scores = [
        meteor_score([words(r)], words(p), wordnet=synonyms) if words(p) and words(r) else 0.0
        for p, r in zip(predictions, references)
    ]
    return float(np.mean(scores)) if scores else 0.0, variant


def perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged model still gives a JSON number."""
    return float(math.exp(min(loss, 50.0)))


def generation_report(totals: Sequence[tuple[float, float]], predictions: Optional[list[dict[str, Any]]]) -> dict:
    """A generation task's eval: loss and perplexity from every process's (summed loss, tokens), plus, given the
    decoded predictions (`prediction`, `reference`, `stopped`), the text metrics, stop rate and the predictions."""
    loss = sum(t for t, _ in totals) / max(sum(n for _, n in totals), 1)
    metrics: dict[str, Any] = {"loss": loss, "perplexity": perplexity(loss)}
    if predictions is not None:
        metrics.update(
            generation_metrics([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
        )
        metrics["stop_rate"] = sum(p["stopped"] for p in predictions) / max(len(predictions), 1)
        metrics["num_examples"] = len(predictions)
        metrics["predictions"] = predictions
    return metrics
