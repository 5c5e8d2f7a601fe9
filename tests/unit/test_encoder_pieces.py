"""The encoder tasks' pure pieces: folding target statistics into a head, threshold tuning, CoNLL files,
and the windows that keep every word (NER) and every answer (QA) of a long input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sft_cli.config.recipe import load_recipe
from sft_cli.data.files import read_conll
from sft_cli.errors import SftError
from sft_cli.model.backbone import embedded_aliases, fold_output_affine
from sft_cli.tasks.metrics import best_multi_label_threshold, best_null_threshold, squad_scores
from sft_cli.tasks.registry import build_task
from sft_cli.tasks.text import load_tokenizer
from tests.conftest import recipe_values, write_recipe


def task_for(tmp_path, task: str, **data):
    values = recipe_values(tmp_path, task=task)
    values["data"] = {**values["data"], **data}
    built = build_task(load_recipe(write_recipe(tmp_path / "r.yaml", values)))
    built.tokenizer = load_tokenizer(str(embedded_aliases()["minilm-l6"]), built.recipe.backbone)
    return built


def test_folding_the_statistics_makes_the_saved_head_predict_in_data_units():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    mean, std = torch.tensor([100.0, -3.0]), torch.tensor([15.0, 0.5])
    folded = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    folded.load_state_dict(fold_output_affine(head.state_dict(), 2, mean, std))
    x = torch.randn(5, 4)
    assert torch.allclose(folded(x), head(x) * std + mean, atol=1e-4)
    assert torch.equal(head.state_dict()["1.bias"], head[1].bias.data)  # the live weights are untouched


def test_folding_needs_a_linear_output_with_a_bias():
    with pytest.raises(SftError, match="normalize_targets"):
        fold_output_affine({"w.weight": torch.ones(3, 4)}, 2, torch.zeros(2), torch.ones(2))


@pytest.mark.parametrize("seed", range(5))
def test_threshold_tuning_never_lowers_micro_f1(seed):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    truth = rng.random((60, 5)) < 0.3
    probabilities = np.clip(truth * 0.3 + rng.random((60, 5)) * 0.7, 0, 1)
    best = best_multi_label_threshold(truth, probabilities, 0.5)
    at = lambda t: f1_score(truth, probabilities >= t, average="micro", zero_division=0)  # noqa: E731
    assert at(best) >= at(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_null_threshold_tuning_never_lowers_f1(seed):
    rng = np.random.default_rng(seed)
    golds = [["yes"] if rng.random() < 0.6 else [] for _ in range(40)]
    found = [{"text": "yes" if rng.random() < 0.7 else "no"} for _ in golds]
    margins = list(rng.normal(size=40))

    def f1(threshold: float) -> float:
        return sum(squad_scores(f["text"] if m <= threshold else "", g)[1] for f, m, g in zip(found, margins, golds))

    assert f1(best_null_threshold(found, margins, golds, 0.0)) >= f1(0.0)


def test_conll_files_read_as_sentences(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O O\n\nAlice NNP B-PER\nwent VBD O\n\n\nParis NNP B-LOC\n")
    assert read_conll([path], "data.train") == {
        "tokens": [["Alice", "went"], ["Paris"]],
        "tags": [["B-PER", "O"], ["B-LOC"]],
    }


def test_a_long_sentence_is_windowed_so_that_every_word_starts_in_some_window(tmp_path):
    task = task_for(tmp_path, "token-classification", max_length=16, stride=4)
    task.names, task.label2id = ["B-X", "O"], {"B-X": 0, "O": 1}
    words = [f"word{i}" if i % 7 else "Paris" for i in range(60)]
    tags = ["B-X" if w == "Paris" else "O" for w in words]
    encoded = task.encode([words], [tags], [0])
    assert len(encoded["input_ids"]) > 3 and all(len(ids) <= 16 for ids in encoded["input_ids"])
    started = {w for starts in encoded["word_index"] for w in starts if w >= 0}
    assert started == set(range(60))
    for starts, labels in zip(encoded["word_index"], encoded["labels"]):
        assert [task.names[label] for w, label in zip(starts, labels) if w >= 0] == [tags[w] for w in starts if w >= 0]


def test_stitching_takes_each_word_from_its_most_central_window(tmp_path):
    task = task_for(tmp_path, "token-classification")
    task.names, task.label2id = ["B-X", "O"], {"B-X": 0, "O": 1}
    votes = [(0, 0, 0, 0), (0, 0, 1, 3), (0, 1, 0, 2)]  # word 0: an edge vote for B-X, a central one for O
    assert task.stitch(votes, {0: 3}) == {0: ["O", "B-X", "O"]}  # word 2 had no sub-token: O, still scored


def test_an_answer_beyond_the_first_window_is_labelled_in_the_window_that_holds_it(tmp_path):
    task = task_for(tmp_path, "question-answering", max_length=32, stride=8)
    filler = " ".join(f"line{i} says nothing." for i in range(30))
    context = filler + " zlib: Compress data with deflate."
    answer = {"text": ["Compress data with deflate."], "answer_start": [context.index("Compress")]}
    encoded = task.encode({"question": ["What does zlib do?"], "context": [context], "answers": [answer]}, [0])
    labelled = [i for i, s in enumerate(encoded["start"]) if s > 0]
    assert len(encoded["input_ids"]) > 3 and labelled and labelled[0] > 0
    window = labelled[0]
    first, last = encoded["start"][window], encoded["end"][window]
    spans = encoded["offsets"][window]
    assert context[spans[first][0] : spans[last][1]] == "Compress data with deflate."


@pytest.mark.parametrize(
    "task, metric, direction",
    [
        ("classification", "eval_loss", "minimize"),
        ("regression", "eval_rmse", "minimize"),
        ("multi-label-classification", "eval_micro_f1", "maximize"),
        ("token-classification", "eval_f1", "maximize"),
        ("question-answering", "eval_f1", "maximize"),
    ],
)
def test_a_sweep_optimizes_the_tasks_main_metric_unless_told_otherwise(tmp_path, task, metric, direction):
    from sft_cli.commands.sweep import sweep_objective as objective

    values = recipe_values(tmp_path, task=task)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", values))
    assert objective(recipe, None, None) == (metric, direction)
    assert objective(recipe, "eval_loss", None) == ("eval_loss", "minimize")
    assert objective(recipe, "eval_accuracy", "maximize") == ("eval_accuracy", "maximize")
    values["schedule"]["early_stopping"] = {"metric": "eval_exact_match", "mode": "max", "patience": 2}
    stopping = load_recipe(write_recipe(tmp_path / "s.yaml", values))
    assert objective(stopping, None, None) == ("eval_exact_match", "maximize")
