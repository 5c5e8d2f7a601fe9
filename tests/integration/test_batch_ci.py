"""CI and batch use through the real CLI: sft check, --json, sft runs, run locks, exit codes, plain logs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, recipe_values, write_jsonl, write_recipe

pytestmark = pytest.mark.integration


def sft(*args: str, cwd: Path = REPO, env: dict | None = None, wait: bool = True):
    cmd = [sys.executable, "-m", "sft_cli", *args]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=cwd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def digits():
    """data/digits as `make digits` writes it (not committed): the digits recipe reads it."""
    if not (REPO / "data" / "digits" / "test").is_dir():
        done = subprocess.run(
            [sys.executable, "scripts/make_digits.py", "data/digits"], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    return REPO / "data" / "digits"


@pytest.fixture(scope="module")
def digits_gen():
    """data/digits-gen as `make digits-gen` writes it (not committed): the image-generation recipes read it."""
    if not (REPO / "data" / "digits-gen" / "test").is_dir():
        done = subprocess.run(
            [sys.executable, "scripts/make_digit_images.py", "data/digits-gen"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
    return REPO / "data" / "digits-gen"


@pytest.fixture(scope="module")
def speech_data():
    """data/speech for the speech recipe (not committed; `make speech-data` synthesizes it with espeak-ng): where
    it is missing, the committed fixture clips, in the same layout, stand in for it."""
    import shutil

    target = REPO / "data" / "speech"
    if not (target / "test.jsonl").exists():
        shutil.copytree(REPO / "tests" / "fixtures" / "speech", target, dirs_exist_ok=True)
    return target


def test_check_passes_every_shipped_recipe(digits, digits_gen, speech_data, tmp_path):
    recipes = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))
    scratch = tmp_path / "tmp"  # its own temp dir: another test process may be running `sft check` meanwhile
    scratch.mkdir()
    done = sft("check", *recipes, "--json", env={"TMPDIR": str(scratch)})
    rows = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:] + json.dumps(rows, indent=1)
    assert {r["recipe"] for r in rows} == set(recipes)
    for row in rows:
        if row["recipe"].startswith(
            "recipes/examples/"
        ):  # Qwen / SmolLM from the hub: skipped offline, with the reason
            assert row["status"] == "skipped" and "hub" in row["error"]
        else:
            assert row["status"] == "pass", row
    order = [r["recipe"] for r in rows]
    assert order.index("recipes/chat/pretrain.yaml") < order.index("recipes/chat/sft.yaml")  # its backbone first
    assert order.index("recipes/chat/sft.yaml") < order.index("recipes/preference/dpo.yaml")  # DPO on that SFT model
    # the image-generation recipes after the classifier that scores them (eval.feature_model) and their backbone
    assert order.index("recipes/diffusion/classifier.yaml") < order.index("recipes/diffusion/pretrain.yaml")
    assert order.index("recipes/diffusion/pretrain.yaml") < order.index("recipes/diffusion/finetune.yaml")
    assert not any(p.name.startswith("sft-check-") for p in scratch.iterdir())


def test_check_fails_a_recipe_with_a_broken_data_file_naming_it(tmp_path):
    rows = [json.dumps(r) for r in [{"text": "fine", "label": "a"}, {"text": "also", "label": "b"}]]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(rows[:1] + ['{"text": "cut off', *rows[1:]]) + "\n")
    good = write_recipe(tmp_path / "good.yaml", recipe_values(tmp_path, output={"dir": str(tmp_path / "good")}))
    values = recipe_values(tmp_path, output={"dir": str(tmp_path / "bad")})
    values["data"]["train"] = str(broken)
    bad = write_recipe(tmp_path / "bad.yaml", values)
    done = sft("check", str(good), str(bad), cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stdout.splitlines()  # one plain line per recipe in a CI log
    assert any(line.startswith("PASS") and str(good) in line for line in lines), done.stdout
    failed = next(line for line in lines if line.startswith("FAIL"))
    assert str(bad) in failed and str(broken) in failed and "line 2" in failed
    assert not (tmp_path / "bad").exists() and not (tmp_path / "good").exists()  # check writes nothing there


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(tmp / "r.yaml", recipe_values(tmp, schedule={"epochs": 1, "batch_size": 16}))
    done = sft("finetune", str(recipe), "--json", cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, recipe, done


def test_json_stdout_is_one_document_for_every_command(finished, tiny_decoder):
    tmp, recipe, trained = finished
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 16 and summary == json.loads((tmp / "run" / "summary.json").read_text())
    assert "training summary" not in trained.stdout and "training summary" in trained.stderr  # humans: stderr
    evaluated = sft("eval", str(recipe), "--json", cwd=tmp)
    assert json.loads(evaluated.stdout)["accuracy"] == json.loads((tmp / "run" / "eval.json").read_text())["accuracy"]
    planned = json.loads(sft("plan", str(recipe), "--json", cwd=tmp).stdout)
    assert planned["steps_per_epoch"] == 16 and planned["trainable_params"] > 0
    checked = json.loads(sft("check", str(recipe), "--json", cwd=tmp).stdout)
    assert checked[0]["status"] == "pass" and set(checked[0]) >= {
        "recipe",
        "name",
        "task",
        "status",
        "seconds",
        "error",
    }
    lm = {
        "task": "language-modeling",
        "backbone": {"name": str(tiny_decoder)},
        "data": {"train": str(REPO / "data" / "python-docs" / "eval.txt"), "max_length": 32},
        "schedule": {"max_steps": 2, "batch_size": 8},
        "engine": {"device": "cpu"},
        "output": {"dir": str(tmp / "lm")},
    }
    pretrained = sft("pretrain", str(write_recipe(tmp / "lm.yaml", lm)), "--json", cwd=tmp)
    assert json.loads(pretrained.stdout)["steps"] == 2
    error = sft("eval", str(recipe), "optim.lr=0", "--json", cwd=tmp)
    assert error.returncode == 2 and error.stdout == "" and error.stderr.startswith("error: ")


def test_logs_are_plain_without_a_terminal_or_with_no_color(finished):
    tmp, recipe, trained = finished
    assert "\x1b[" not in trained.stderr and "\x1b[" not in trained.stdout  # not a TTY: no colour, no bar redraws
    assert "step 12/16" in trained.stderr  # one readable line per log record instead of a progress bar


def test_runs_shows_finished_interrupted_running_and_failed(finished, tmp_path):
    tmp, _, _ = finished
    root = tmp_path / "runs"
    (root).mkdir()
    # interrupted: Ctrl-C mid-run leaves a checkpoint
    slow = write_recipe(
        tmp_path / "slow.yaml",
        recipe_values(
            tmp_path,
            schedule={"epochs": 50, "batch_size": 4},
            output={"dir": str(root / "interrupted"), "save_every": 5},
        ),
    )
    process = sft("finetune", str(slow), wait=False, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list((root / "interrupted" / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    # while it trains: running, and a second finetune into the same directory is refused naming the holder
    listed = {r["name"]: r for r in json.loads(sft("runs", str(root), "--format", "json").stdout)}
    assert listed["tiny"]["status"] == "running"
    second = sft("finetune", str(slow), "--overwrite", cwd=tmp_path)
    assert second.returncode == 2 and f"pid {process.pid}" in second.stderr and second.stderr.count("\n") == 1
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    # failed: the loss goes NaN
    nan = write_recipe(
        tmp_path / "nan.yaml",
        recipe_values(
            tmp_path,
            optim={"lr": 1e30},
            schedule={"epochs": 1, "batch_size": 16, "max_grad_norm": None},
            output={"dir": str(root / "failed")},
        ),
    )
    assert sft("finetune", str(nan), cwd=tmp_path).returncode == 2
    os.symlink(tmp / "run", root / "finished")
    rows = json.loads(sft("runs", str(root), "--format", "json", "--sort", "dir").stdout)
    status = {Path(r["dir"]).name: r["status"] for r in rows}
    assert status == {"finished": "finished", "interrupted": "interrupted", "failed": "failed"}
    for row in rows:
        assert {"dir", "name", "task", "status", "step", "metric", "value"} <= set(row)
    done = next(r for r in rows if r["status"] == "finished")
    assert (
        done["metric"] == "accuracy"
        and done["value"] == json.loads((tmp / "run" / "eval.json").read_text())["accuracy"]
    )
    table = sft("runs", str(root), "--format", "md", "--sort", "step", "--desc").stdout
    assert table.splitlines()[0].startswith("| dir | name | task | status |") and len(table.splitlines()) == 5
    csv_text = sft("runs", str(root), "--format", "csv").stdout
    assert csv_text.splitlines()[0].startswith("dir,name,task,status")


def test_a_stale_lock_from_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".sft.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "finetune"}))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(tmp_path, schedule={"max_steps": 2, "batch_size": 8}))
    done = sft("finetune", str(recipe), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (run / ".sft.lock").exists()  # released at the end


def test_an_internal_error_is_exit_1_asking_for_a_report(tmp_path):
    """A bug (here: one injected from outside with sitecustomize) is exit 1 and asks for a --debug report."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import sft_cli.commands.plan\n"
        "def broken(recipe):\n"
        "    raise KeyError('an unexpected bug')\n"
        "sft_cli.commands.plan.plan = broken\n"
    )
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(tmp_path))
    env = {"PYTHONPATH": f"{hooks}{os.pathsep}{REPO}"}
    done = sft("plan", str(recipe), cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    assert "internal error" in done.stderr and "--debug" in done.stderr and "Traceback" not in done.stderr
    debug = sft("--debug", "plan", str(recipe), cwd=tmp_path, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "an unexpected bug" in debug.stderr


def test_balanced_class_weights_raise_macro_f1_on_imbalanced_labels(tmp_path):
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    rng = __import__("random").Random(0)
    words = "the a report about this that with from our their system data value file".split()
    cues = {"common": "excellent", "rare": "terrible", "rarer": "broken"}
    counts = {"common": 180, "rare": 14, "rarer": 6}

    def rows(seed: int):
        rng.seed(seed)
        out = []
        for label, n in counts.items():
            for _ in range(n):
                text = rng.choices(words, k=6)
                text.insert(rng.randint(0, 6), cues[label])
                out.append({"text": " ".join(text), "label": label})
        rng.shuffle(out)
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(1))
    test = write_jsonl(tmp_path / "test.jsonl", rows(2))
    scores = {}
    for weights in (None, "balanced"):
        values = recipe_values(
            tmp_path,
            data={"train": str(train), "eval": str(test), "max_length": 16},
            loss={"class_weights": weights},
            optim={"lr": 1e-3},
            schedule={"epochs": 6, "batch_size": 16, "warmup": 0.0},  # unweighted never learns the rare labels
            output={"dir": str(tmp_path / f"run-{weights}")},
        )
        recipe = load_recipe(write_recipe(tmp_path / f"{weights}.yaml", values))
        summary = commands.train(recipe, "finetune")
        scores[weights] = commands.evaluate_model(recipe)
        if weights == "balanced":
            used = summary["class_weights"]
            assert used["rarer"] > used["rare"] > used["common"]
    assert scores["balanced"]["macro_f1"] > scores[None]["macro_f1"] + 0.1, (
        scores[None]["macro_f1"],
        scores["balanced"]["macro_f1"],
    )
    assert scores["balanced"]["balanced_accuracy"] > scores[None]["balanced_accuracy"]
