"""A damaged run directory gets one line and exit 2 from every command that reads it — never 'a bug in sft' —
and the files a run leaves are the ones the README lists."""

import re
import shutil
from pathlib import Path

import pytest

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from tests.conftest import REPO, TINY_BERT, keyword_rows, write_jsonl, write_recipe
from tests.integration.test_bad_input import invoke

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished, evaluated tiny classification run (and its recipe beside it)."""
    tmp = tmp_path_factory.mktemp("damaged")
    texts = write_jsonl(tmp / "texts.jsonl", keyword_rows(40, 0))
    values = {
        "name": "tiny",
        "task": "classification",
        "backbone": {"name": "minilm-l6", "from_scratch": True, "config": TINY_BERT},
        "data": {"train": str(texts), "eval": str(texts), "max_length": 32},
        "schedule": {"max_steps": 4, "batch_size": 8, "warmup": 0.0, "log_every": 1},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "output": {"dir": str(tmp / "run"), "save_every": 2},
    }
    recipe = load_recipe(write_recipe(tmp / "r.yaml", values))
    commands.train(recipe, "finetune")
    commands.evaluate_model(recipe)
    return tmp / "run"


def test_the_readme_lists_every_file_a_run_leaves(trained):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("## What a run leaves in `output.dir`", 1)[1].split("### `eval.json` keys", 1)[0]
    listed = {re.sub(r"/.*", "", name) for name in re.findall(r"`([^`]+)`", table)}
    written = {p.name for p in trained.iterdir()}
    assert written <= listed, f"written but not in the README table: {written - listed}"


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)]),
    "garbage": lambda p: p.write_bytes(b"\x00\xff garbage \x80" * 7),
    "missing": lambda p: p.unlink(),
    "a directory": lambda p: (p.unlink(), p.mkdir()),
}
FILES = [
    "model/config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "model/tokenizer_config.json",
    "recipe.yaml",
    "eval.json",
    "metrics.jsonl",
    "summary.json",
]
CASES = [(f, c) for f in FILES for c in CORRUPTIONS]


@pytest.mark.parametrize("name, corruption", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_a_damaged_file_is_one_line_never_exit_1(trained, tmp_path, monkeypatch, name, corruption):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    CORRUPTIONS[corruption](run / name)
    rows = write_jsonl(tmp_path / "in.jsonl", keyword_rows(3, 2))
    command = ["predict", "export", "runs"][CASES.index((name, corruption)) % 3]
    args = {
        "predict": ["predict", str(run), "--input", str(rows), "--output", str(tmp_path / "out.jsonl")],
        "export": ["export", str(run), "--to", str(tmp_path / "exported")],
        "runs": ["runs", str(tmp_path), "--format", "json"],
    }[command]
    code, stderr = invoke(args, tmp_path, monkeypatch)
    assert code in (0, 2), stderr
    assert "internal error" not in stderr and "Traceback" not in stderr
    if code == 2:
        assert stderr.strip().count("\n") == 0 and stderr.startswith("error: ")


def test_eval_of_a_truncated_model_names_the_file(trained, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    weights = run / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    recipe = run.parent / "r.yaml"
    shutil.copy(trained.parent / "r.yaml", recipe)
    code, stderr = invoke(["eval", str(recipe), f"output.dir={run}"], tmp_path, monkeypatch)
    assert code == 2 and "model.safetensors is truncated or corrupted" in stderr


def test_resume_falls_back_past_a_damaged_newest_checkpoint(trained, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "summary.json").unlink()
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert [p.name for p in saved] == ["step-00000002", "step-00000004"]
    (saved[-1] / "trainer_state.pt").write_bytes(b"torn")
    recipe = load_recipe(trained.parent / "r.yaml", [f"output.dir={run}", "schedule.max_steps=6"])
    summary = commands.train(recipe, "finetune", resume="")
    assert "step-00000004 is damaged" in caplog.text and "resuming from step-00000002" in caplog.text
    assert summary["steps"] == 6


def test_merge_lora_on_a_full_model_says_so(trained, tmp_path, caplog):
    from sft_cli.commands.export import export

    result = export(trained, tmp_path / "exported", merge_lora=True, dtype=None)
    assert not result["merged"] and "nothing to merge" in caplog.text


def test_predict_resume_refuses_another_models_output(trained, tmp_path):
    from sft_cli.commands.predict import predict
    from sft_cli.rundir.layout import resolve_run

    rows = str(write_jsonl(tmp_path / "in.jsonl", keyword_rows(5, 3)))
    out = tmp_path / "out.jsonl"
    recipe, run = resolve_run(trained)
    predict(recipe, run / "model", rows, out)
    other = tmp_path / "other"
    shutil.copytree(run / "best-model", other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8  # another model: the same shapes, other weights
    weights.write_bytes(bytes(data))
    with pytest.raises(Exception, match="written from another model.*--overwrite"):
        predict(recipe, other, rows, out, resume=True)
    recipe.predict.top_k = 1
    with pytest.raises(Exception, match="predict.top_k=5"):
        predict(recipe, run / "model", rows, out, resume=True)
    recipe.predict.top_k = 5
    assert predict(recipe, run / "model", rows, out, resume=True)["resumed_after"] == 5
