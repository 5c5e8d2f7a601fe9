"""Conversational SFT end to end on a tiny Llama: eval, the transformers reload, packing, bad rows, plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_cli.commands import train as commands
from sft_cli.commands.plan import plan
from sft_cli.config.recipe import load_recipe
from sft_cli.errors import SftError
from sft_cli.tasks.registry import build_task
from tests.conftest import REPO, full_logits, read_jsonl, write_jsonl, write_recipe

pytestmark = pytest.mark.integration
CHAT = REPO / "data" / "stdlib-chat"


def chat_values(tmp: Path, model: Path, **data) -> dict:
    train = write_jsonl(tmp / "train.jsonl", read_jsonl(CHAT / "train.jsonl")[:240])
    test = write_jsonl(tmp / "test.jsonl", read_jsonl(CHAT / "test.jsonl")[:24])
    return {
        "name": "chat",
        "task": "generation",
        "backbone": {"name": str(model)},
        "data": {"train": str(train), "eval": str(test), "chat_template": "chatml", "max_length": 96, **data},
        "optim": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"max_steps": 90, "epochs": 6, "batch_size": 16, "warmup": 0.0, "log_every": 10},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "eval": {"max_new_tokens": 12, "batch_size": 8},
        "output": {"dir": str(tmp / "run")},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_decoder):
    tmp = tmp_path_factory.mktemp("chat")
    recipe = load_recipe(write_recipe(tmp / "chat.yaml", chat_values(tmp, tiny_decoder)))
    summary = commands.train(recipe, "finetune")
    metrics = commands.evaluate_model(recipe)
    return tmp, recipe, summary, metrics


def test_eval_writes_one_prediction_per_conversation_in_file_order(trained):
    tmp, recipe, _, metrics = trained
    rows = read_jsonl(tmp / "run" / "predictions.jsonl")
    source = read_jsonl(Path(recipe.data.eval))
    assert len(rows) == len(source) == metrics["num_examples"]
    for row, conversation in zip(rows, source):
        assert row["messages"] == conversation["messages"][:-1]  # the history given to the model
        assert row["reference"] == conversation["messages"][-1]["content"]
        assert set(row) == {"messages", "reference", "prediction", "stopped"}
    assert metrics["stop_rate"] == pytest.approx(sum(r["stopped"] for r in rows) / len(rows))
    assert {"loss", "exact_match", "bleu", "rouge_l", "stop_rate"} <= set(metrics)
    assert metrics["stop_rate"] > 0.5  # the end-of-turn token was trained: replies end


def test_summary_counts_trained_tokens_per_role(trained):
    _, _, summary, _ = trained
    roles = summary["trained_tokens_per_role"]
    assert roles["assistant"]["trained"] > 0 and roles["user"]["trained"] == 0 and roles["system"]["trained"] == 0


RELOAD = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, eval_file, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
for line in open(eval_file):
    history = json.loads(line)["messages"][:-1]
    inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=limit, do_sample=False)
    print(json.dumps(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
"""


def test_plain_transformers_reproduces_sft_evals_greedy_predictions(trained):
    tmp, recipe, _, _ = trained
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp / "run" / "model"), recipe.data.eval, str(recipe.eval.max_new_tokens)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,  # a fresh process that imports nothing from sft
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = [json.loads(line) for line in done.stdout.splitlines()]
    ours = [r["prediction"] for r in read_jsonl(tmp / "run" / "predictions.jsonl")]
    assert theirs == ours


@pytest.mark.parametrize("isolation", ["position_ids", "mask"])
def test_packing_gives_the_same_per_example_loss_as_unpacked(tmp_path, tiny_decoder, isolation):
    values = chat_values(tmp_path, tiny_decoder, packing=True, max_length=256)
    task = build_task(load_recipe(write_recipe(tmp_path / "r.yaml", values)))
    task.setup(train=True)
    assert task.isolation == "position_ids"  # Llama isolates packed examples from position_ids alone
    task.isolation = isolation
    task.model.eval()
    rows = max(task.train_set.rows, key=lambda r: len(r["input_ids"]))
    assert len(rows["input_ids"]) >= 2  # a row really holds several conversations
    singles = [{"input_ids": ids, "trained": mask} for ids, mask in zip(rows["input_ids"], rows["trained"])]
    with torch.no_grad():
        alone = [task.loss_terms(task.model, task.collate([s], train=False))["sup"][0].item() for s in singles]
        packed = task.loss_terms(task.model, task.collate([rows], train=False))["sup"][0].item()
        batch = task.collate([rows], train=False)
        logits = full_logits(task, batch)
    assert packed == pytest.approx(sum(alone), rel=1e-4)
    # per example, not just in total: each segment's loss equals its unpacked loss
    per_token = torch.nn.functional.cross_entropy(logits[0], batch["labels"][0], ignore_index=-100, reduction="none")
    for number, expected in enumerate(alone):
        assert per_token[batch["segment_ids"][0] == number].sum().item() == pytest.approx(expected, rel=1e-4)
    assert task.summary_extras()["packing_efficiency"] > 0.8


def test_an_invalid_conversation_names_the_file_and_row(tmp_path, tiny_decoder):
    rows = read_jsonl(CHAT / "train.jsonl")[:20]
    rows[6]["messages"] = [m for m in rows[6]["messages"] if m["role"] != "assistant"][:2]
    rows[11]["messages"][-1]["role"] = "robot"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    values = chat_values(tmp_path, tiny_decoder, max_length=256)
    values["data"]["train"] = str(bad)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", values))
    with pytest.raises(SftError) as err:
        build_task(recipe).setup(train=True)
    assert f"{bad} row 7" in str(err.value) and "data.skip_invalid" in str(err.value)
    values["data"]["skip_invalid"] = True
    info = plan(load_recipe(write_recipe(tmp_path / "r.yaml", values)))
    assert info["skipped_rows_by_split"]["data.train"] == {"invalid conversation": 2}
    assert info["train_examples"] == 18


def test_plan_marks_trained_spans_and_role_shares(tmp_path, tiny_decoder, capsys):
    values = chat_values(tmp_path, tiny_decoder)
    info = plan(load_recipe(write_recipe(tmp_path / "r.yaml", values)))
    shown = capsys.readouterr().out
    assert "[trained]" in shown and "[no loss]" in shown and "<|im_start|>assistant" in shown
    assert "tokens trained per role" in shown
    assert 0 < info["trained_tokens_per_role"]["assistant"]["share"] < 1  # the headers never train
    everything = plan(load_recipe(write_recipe(tmp_path / "all.yaml", {**values, "loss": {"train_on": "all"}})))
    assert everything["trained_tokens_per_role"]["user"]["share"] == 1.0


def test_a_conversational_dataset_without_a_template_asks_for_one(tmp_path, tiny_decoder):
    values = chat_values(tmp_path, tiny_decoder)
    values["data"]["chat_template"] = None
    with pytest.raises(SftError, match="set data.chat_template: chatml"):
        build_task(load_recipe(write_recipe(tmp_path / "r.yaml", values))).setup(train=True)


# -- use the trained model: sft predict, sft chat, sft export ------------------------------------------------


def cli(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", *args], input=stdin, capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_generation_predict_matches_sft_evals_greedy_predictions(trained):
    tmp, recipe, _, _ = trained
    histories = [{"messages": r["messages"][:-1]} for r in read_jsonl(Path(recipe.data.eval))]
    source = write_jsonl(tmp / "histories.jsonl", histories)
    limit = f"predict.max_new_tokens={recipe.eval.max_new_tokens}"
    cli("predict", str(tmp / "run"), "--input", str(source), limit, "predict.batch_size=5", cwd=tmp)
    rows = read_jsonl(tmp / "run" / "histories.predictions.jsonl")
    evaluated = read_jsonl(tmp / "run" / "predictions.jsonl")
    assert [r["messages"] for r in rows] == [h["messages"] for h in histories]
    assert [r["prediction"] for r in rows] == [e["prediction"] for e in evaluated]
    assert all(isinstance(r["num_tokens"], int) and isinstance(r["stopped"], bool) for r in rows)


def test_predict_refuses_a_conversation_that_does_not_end_on_a_user_turn(trained):
    tmp, recipe, _, _ = trained
    done = subprocess.run(
        [sys.executable, "-m", "sft_cli", "predict", str(tmp / "run"), "--input", recipe.data.eval],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert done.returncode == 2 and "row 1" in done.stderr and "not a user turn" in done.stderr
    assert done.stderr.count("\n") == 1


def test_chat_over_stdin_keeps_history(trained):
    tmp, _, _, _ = trained
    run = str(tmp / "run")
    saved = tmp / "saved.jsonl"
    first = cli(
        "chat", run, cwd=tmp, stdin=f"What does `json.dumps` do?\nWhich module is that in?\n/save {saved}\n"
    ).stdout
    second = cli(
        "chat", run, cwd=tmp, stdin="What does `socket.create_connection` do?\nWhich module is that in?\n"
    ).stdout
    a, b = first.splitlines(), second.splitlines()
    assert len(a) == len(b) == 2  # one reply per line
    assert a[1] != b[1]  # the same second question, answered from a different first turn
    row = read_jsonl(saved)[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert row["messages"][1]["content"] == a[0] and row["messages"][3]["content"] == a[1]
    reset = cli("chat", run, cwd=tmp, stdin="What does `json.dumps` do?\n/reset\nWhich module is that in?\n").stdout
    alone = cli("chat", run, cwd=tmp, stdin="Which module is that in?\n").stdout
    assert reset.splitlines()[1] == alone.splitlines()[0]  # /reset forgets the first turn


def test_export_loads_in_a_fresh_process_with_only_transformers(trained, tmp_path):
    tmp, recipe, _, _ = trained
    cli("export", str(tmp / "run"), "--to", str(tmp_path / "export"), cwd=tmp)
    card = (tmp_path / "export" / "README.md").read_text()
    front = __import__("yaml").safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-generation" and "conversational" in front["tags"]
    history = read_jsonl(Path(recipe.data.eval))[0]["messages"][:-1]
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "d, history = sys.argv[1], json.loads(sys.argv[2])\n"
        "tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "inputs = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "with torch.no_grad(): logits = model(**inputs).logits[0, -1]\n"
        "out = model.generate(**inputs, max_new_tokens=12, do_sample=False)\n"
        "print(json.dumps([logits[:50].tolist(), tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)]))\n"
    )
    outputs = []
    for directory in (tmp_path / "export", tmp / "run" / "model"):
        done = subprocess.run(
            [sys.executable, "-c", script, str(directory), json.dumps(history)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout))
    assert outputs[0][0] == pytest.approx(outputs[1][0], abs=1e-5)
    assert outputs[0][1] == outputs[1][1]
    assert outputs[0][1].strip() == read_jsonl(tmp / "run" / "predictions.jsonl")[0]["prediction"]
