"""Every mistake gets one line on stderr, exit code 2, no traceback, and nothing in output.dir changes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import keyword_rows, recipe_values, write_jsonl

pytestmark = pytest.mark.integration


def base(tmp: Path, **sections) -> dict:
    return recipe_values(tmp, **sections)


def recipe_file(tmp: Path, values: dict) -> str:
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def with_data(tmp: Path, **data) -> dict:
    values = base(tmp)
    values["data"] = {**values["data"], **data}
    return values


def case_missing_recipe(tmp):
    return ["finetune", str(tmp / "nope.yaml")], "recipe file not found"


def case_yaml_syntax(tmp):
    (tmp / "bad.yaml").write_text("task: classification\ndata: {train: x\n")
    return ["finetune", str(tmp / "bad.yaml")], "line"


def case_top_level_list(tmp):
    (tmp / "list.yaml").write_text("- a\n- b\n")
    return ["finetune", str(tmp / "list.yaml")], "must be a mapping"


def case_unknown_key(tmp):
    values = base(tmp)
    values["optim"]["lrr"] = 1
    return ["finetune", recipe_file(tmp, values)], "did you mean 'optim.lr'"


def case_wrong_type(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.batch_size=lots"], "'schedule.batch_size' expects int"


def case_lr_zero(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "optim.lr=0"], "optim.lr"


def case_batch_size_zero(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.batch_size=0"], "schedule.batch_size"


def case_max_length_zero(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "data.max_length=0"], "data.max_length"


def case_negative_epochs(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.epochs=-1"], "schedule.epochs"


def case_warmup_ratio_mixup(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.warmup=1.5"], "schedule.warmup"


def case_unknown_task(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "task=regresion"], "did you mean 'regression'"


def case_unknown_policy(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "freeze.policy=head_only"], "did you mean 'head-only'"


def case_unknown_optimizer(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "optim.name=adamm"], "'optim.name' must be one of"


def case_unknown_scheduler(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.scheduler=cosin"], "did you mean 'cosine'"


def case_data_file_missing(tmp):
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(tmp / "missing.jsonl")))], "file not found"


def case_unsupported_extension(tmp):
    (tmp / "train.xlsx").write_text("x")
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(tmp / "train.xlsx")))], "unsupported format"


def case_empty_dataset(tmp):
    (tmp / "empty.jsonl").write_text("")
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(tmp / "empty.jsonl")))], "empty"


def case_malformed_jsonl(tmp):
    (tmp / "broken.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(tmp / "broken.jsonl")))], "line 2 is not valid JSON"


def case_missing_text_column(tmp):
    return ["finetune", recipe_file(tmp, with_data(tmp, text_field="sentence"))], "columns: text, label"


def case_missing_label_column(tmp):
    return ["finetune", recipe_file(tmp, with_data(tmp, label_field="category"))], "columns: text, label"


def case_unseen_eval_label(tmp):
    rows = keyword_rows(8, 3) + [{"text": "something new", "label": "neutral"}]
    return [
        "finetune",
        recipe_file(tmp, with_data(tmp, eval=str(write_jsonl(tmp / "ev.jsonl", rows)))),
    ], "never seen in training"


def case_single_class(tmp):
    rows = [{"text": f"line {i}", "label": "only"} for i in range(10)]
    return [
        "finetune",
        recipe_file(tmp, with_data(tmp, train=str(write_jsonl(tmp / "one.jsonl", rows)))),
    ], "only one label"


def case_non_utf8(tmp):
    (tmp / "latin.csv").write_bytes("text,label\ncaf\xe9 ol\xe9,a\nna\xefve,b\n".encode("latin-1") * 20)
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(tmp / "latin.csv")))], "not UTF-8"


def case_unknown_backbone(tmp):
    values = base(tmp)
    values["backbone"] = {"name": "someone/not-a-model", "from_scratch": False}
    return ["finetune", recipe_file(tmp, values)], "HF_HUB_OFFLINE"


def case_backbone_without_weights(tmp):
    folder = tmp / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    values = base(tmp)
    values["backbone"] = {"name": str(folder), "from_scratch": False}
    return ["finetune", recipe_file(tmp, values)], "no weights"


def case_freeze_pattern_matches_nothing(tmp):
    return [
        "finetune",
        recipe_file(tmp, base(tmp)),
        "freeze.policy=patterns",
        "freeze.trainable=[nothing_like_this]",
    ], "matches no parameter"


def case_resume_without_checkpoint(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "--resume"], "no checkpoint"


def case_finished_run(tmp):
    (tmp / "run" / "summary.json").write_text("{}")
    return ["finetune", recipe_file(tmp, base(tmp))], "--overwrite"


def case_output_not_writable(tmp):
    (tmp / "a-file").write_text("")
    return ["finetune", recipe_file(tmp, base(tmp)), f"output.dir={tmp / 'a-file' / 'run'}"], "cannot write"


def case_override_syntax(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "optim.lr"], "expected key=value"


def case_wrong_command_for_task(tmp):
    return ["pretrain", recipe_file(tmp, base(tmp))], "sft finetune"


def case_eval_without_model(tmp):
    return ["eval", recipe_file(tmp, base(tmp))], "no trained model"


def case_missing_prompt_column(tmp):
    values = base(tmp, task="generation")
    return ["finetune", recipe_file(tmp, values)], "columns: text, label"


def case_fp16_on_cpu(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "engine.precision=fp16"], "fp16 needs a CUDA GPU"


def case_bad_template(tmp):
    values = base(tmp, task="generation")
    rows = [{"prompt": "p", "response": "r"}] * 4
    values["data"] = {"train": str(write_jsonl(tmp / "g.jsonl", rows)), "template": "{question} =>"}
    return ["finetune", recipe_file(tmp, values)], "data.template"


def case_negative_warmup(tmp):
    return ["finetune", recipe_file(tmp, base(tmp)), "schedule.warmup=-1"], "'schedule.warmup' must be >= 0"


def case_key_given_twice(tmp):
    text = Path(recipe_file(tmp, base(tmp))).read_text() + "schedule: {epochs: 1}\n"
    (tmp / "twice.yaml").write_text(text)
    return ["finetune", str(tmp / "twice.yaml")], "key 'schedule' is given twice (lines"


def case_every_label_null(tmp):
    rows = [{"text": r["text"], "label": None} for r in keyword_rows(8, 0)]
    return ["finetune", recipe_file(tmp, with_data(tmp, train=str(write_jsonl(tmp / "nolabels.jsonl", rows))))], (
        "data.train: no usable row"
    )


def case_unreadable_image(tmp):
    import numpy as np
    from PIL import Image

    for label in ("a", "b"):
        (tmp / "img" / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp / "img" / label / f"{i}.png")
    (tmp / "img" / "a" / "broken.png").write_text("this is text, not a PNG")
    values = base(tmp, task="image-classification")
    values["backbone"] = {"arch": "resnet", "from_scratch": True, "config": {"hidden_sizes": [8], "depths": [1]}}
    values["data"] = {"train": str(tmp / "img"), "image_size": 8}
    return ["finetune", recipe_file(tmp, values)], "broken.png is not a readable image"


def task_data(tmp: Path, task: str, rows: list[dict], eval_rows: list[dict] | None = None, **data) -> dict:
    """A tiny recipe of `task` over the given training (and eval) rows."""
    values = base(tmp, task=task)
    train = write_jsonl(tmp / "data" / "task-train.jsonl", rows)
    test = write_jsonl(tmp / "data" / "task-test.jsonl", eval_rows or rows)
    values["data"] = {**values["data"], "train": str(train), "eval": str(test), **data}
    return values


NER_ROWS = [{"tokens": ["Alice", "went", "home"], "tags": ["B-PER", "O", "O"]}] * 3


def case_tokens_and_tags_differ(tmp):
    rows = NER_ROWS[:1] + [{"tokens": ["Bob", "left", "early"], "tags": ["B-PER", "O"]}]
    values = task_data(tmp, "token-classification", rows)
    return ["finetune", recipe_file(tmp, values)], "task-train.jsonl): row 2: 3 words but 2 tags"


def case_empty_token_list(tmp):
    values = task_data(tmp, "token-classification", NER_ROWS + [{"tokens": [], "tags": []}])
    return ["finetune", recipe_file(tmp, values)], "row 4: empty 'tokens' list"


def case_eval_tag_never_seen(tmp):
    values = task_data(tmp, "token-classification", NER_ROWS, [{"tokens": ["Paris"], "tags": ["B-LOC"]}])
    return ["finetune", recipe_file(tmp, values)], "data.eval: tag(s) B-LOC never seen in training"


def case_conll_line_without_tag(tmp):
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "data" / "train.conll").write_text("Alice B-PER\nwent O\n\nBob\n")
    values = task_data(tmp, "token-classification", NER_ROWS)
    values["data"]["train"] = str(tmp / "data" / "train.conll")
    return ["finetune", recipe_file(tmp, values)], "train.conll line 4: 'Bob' has no tag"


def case_non_numeric_target(tmp):
    rows = [{"text": "a b", "score": 1.5}, {"text": "c d", "score": 2}, {"text": "e f", "score": "high"}]
    values = task_data(tmp, "regression", rows, label_field="score")
    return ["finetune", recipe_file(tmp, values)], "row 3: 'score' is 'high', not a number"


def case_unknown_regression_loss(tmp):
    rows = [{"text": "a b", "label": 1.5}, {"text": "c d", "label": 2}]
    values = task_data(tmp, "regression", rows)
    return ["finetune", recipe_file(tmp, values), "loss.regression=hubber"], "did you mean 'huber'"


def case_eval_label_set_never_seen(tmp):
    rows = [{"text": "a b", "label": ["x", "y"]}, {"text": "c d", "label": ["x"]}]
    values = task_data(tmp, "multi-label-classification", rows, [{"text": "e", "label": ["z"]}])
    return ["finetune", recipe_file(tmp, values)], "data.eval: label(s) z never seen in training"


def case_answer_start_misses_its_text(tmp):
    good = {"question": "Who?", "context": "Alice went home.", "answers": {"text": ["Alice"], "answer_start": [0]}}
    bad = {**good, "answers": {"text": ["home"], "answer_start": [3]}}
    values = task_data(tmp, "question-answering", [good, good, bad])
    return ["finetune", recipe_file(tmp, values)], "row 3: 'answers': answer_start 3 does not point at its text"


def seq2seq_data(tmp: Path, rows: list[dict], **data) -> dict:
    """A recipe fine-tuning the tiny random-init T5 (built once per process) on the given rows."""
    from tests.conftest import shared_tiny_seq2seq

    values = task_data(tmp, "generation", rows, **data)
    values["backbone"] = {"name": str(shared_tiny_seq2seq("t5"))}
    return values


PAIRS = [{"source": "The file is closed.", "target": "El archivo está cerrado."}] * 3


def case_seq2seq_missing_target_column(tmp):
    rows = [{"source": r["source"]} for r in PAIRS]
    values = seq2seq_data(tmp, rows, prompt_field="source", response_field="target")
    return ["finetune", recipe_file(tmp, values)], "data.response_field='target': no such column"


def case_seq2seq_empty_target(tmp):
    rows = PAIRS + [{"source": "Open it.", "target": "  "}]
    values = seq2seq_data(tmp, rows, prompt_field="source", response_field="target")
    return ["finetune", recipe_file(tmp, values)], "row 4: the target 'target' is empty"


def case_translation_rows_without_the_target_language(tmp):
    rows = [{"translation": {"en": "The file.", "es": "El archivo."}}] * 3
    values = seq2seq_data(tmp, rows, format="translation", source_lang="en", target_lang="fr")
    return ["finetune", recipe_file(tmp, values)], "data.target_lang: no 'fr' text in any 'translation' row"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_at_least_25_cases():
    assert len(CASES) >= 25


def invoke(args: list[str], cwd: Path, monkeypatch) -> tuple[int, str]:
    """Run the CLI in this process (the same app, argv handling and error path as `sft`); (exit code, stderr)."""
    from typer.testing import CliRunner

    from sft_cli.cli import app, optional_resume_value, state

    monkeypatch.chdir(cwd)
    state["debug"] = False
    result = CliRunner().invoke(app, optional_resume_value(args), env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stderr


def prepared(tmp_path: Path, name: str) -> tuple[list[str], str, Path, dict[str, bytes]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a previous run's log ...
    (run_dir / ".sft-manifest.json").write_text('{"files": ["metrics.jsonl"]}')  # ... recorded as sft's
    (run_dir / "notes.txt").write_text("mine")  # and the user's own file beside it
    args, expected = CASES[name](tmp_path)
    return args, expected, run_dir, snapshot(run_dir)


def assert_one_clear_line(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gets_one_clear_line(tmp_path, name, monkeypatch):
    args, expected, run_dir, before = prepared(tmp_path, name)
    assert_one_clear_line(*invoke(args, tmp_path, monkeypatch), expected)
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["unknown_key", "malformed_jsonl", "eval_without_model"])
def test_the_installed_command_gives_the_same_one_line(tmp_path, name):
    """A few cases through a real `python -m sft_cli` process: the entry point, not just the app."""
    args, expected, run_dir, before = prepared(tmp_path, name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert_one_clear_line(done.returncode, done.stderr, expected)
    assert snapshot(run_dir) == before


def test_debug_shows_the_traceback(tmp_path):
    args, _ = case_lr_zero(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", "--debug", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0 and "Traceback" in done.stderr
