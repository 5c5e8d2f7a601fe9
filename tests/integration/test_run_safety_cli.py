"""Through the real `sft` process: a folder of user files survives every finetune, and a signal during set-up
leaves an honest status.json and no lock."""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, recipe_values, write_recipe
from tests.integration.test_batch_ci import sft

pytestmark = pytest.mark.integration

USER_FILES = {
    "model/my_weights.bin": b"\x00weights",
    "checkpoints/mine.txt": b"mine",
    "eval.json": b'{"mine": 1}',
    "metrics.jsonl": b'{"step": 1}\n',
    "report.png": b"png",
    "recipe.yaml": b"mine: true\n",
    "notes.txt": b"notes",
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_folder_of_user_files_is_never_deleted(tmp_path):
    project = tmp_path / "project"
    for name, content in USER_FILES.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes(content)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        recipe_values(tmp_path, schedule={"max_steps": 3, "batch_size": 8}, output={"dir": str(project)}),
    )
    before = snapshot(project)
    for extra, message in (([], "holds no sft run"), (["--overwrite"], "files sft did not write")):
        done = sft("finetune", str(recipe), *extra, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr[-2000:]
        assert snapshot(project) == before
    # the files a run would replace moved away: --overwrite trains beside the rest and keeps them
    for name in ("model/my_weights.bin", "checkpoints/mine.txt", "eval.json", "metrics.jsonl", "report.png"):
        (project / name).unlink()
    (project / "recipe.yaml").rename(project / "my-recipe.yaml")
    kept = snapshot(project)
    for _ in range(2):  # the second --overwrite replaces the first run's files, and only those
        done = sft("finetune", str(recipe), "--overwrite", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert all(snapshot(project)[name] == content for name, content in kept.items())
    assert (project / "model" / "config.json").exists() and (project / "summary.json").exists()
    again = sft("finetune", str(recipe), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def test_sigterm_during_setup_leaves_an_honest_status_and_no_lock(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import time, sft_cli.engine.trainer\n"
        "original = sft_cli.engine.trainer.Trainer.setup\n"
        "def slow(self, *a, **k):\n"
        "    time.sleep(60)\n"
        "    return original(self, *a, **k)\n"
        "sft_cli.engine.trainer.Trainer.setup = slow\n"
    )
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_values(tmp_path, schedule={"max_steps": 3, "batch_size": 8}))
    process = sft("finetune", str(recipe), cwd=tmp_path, env={"PYTHONPATH": f"{hooks}{os.pathsep}{REPO}"}, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "status.json").exists():
        time.sleep(0.1)
    assert json.loads((run / "status.json").read_text())["status"] == "running"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "failed" and "SIGTERM" in status["error"]
    assert not (run / ".sft.lock").exists()
    assert "interrupted: stopped by SIGTERM" in process.stderr.read()
