"""Runs never lose work: the manifest, locks, checksummed checkpoints, safe resume, honest status, clean errors."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import pytest
import torch

from sft_cli.commands import train as commands
from sft_cli.config.recipe import load_recipe
from sft_cli.errors import SftError, StorageError
from sft_cli.rundir import checkpoints as checkpoint
from sft_cli.rundir import manifest
from sft_cli.rundir.lock import RunLock, holder

# -- the manifest and what a run may replace ---------------------------------------------------------------


def user_folder(root: Path) -> dict[str, str]:
    files = {
        "model/my_weights.bin": "w",
        "checkpoints/mine.txt": "c",
        "eval.json": "{}",
        "notes.txt": "n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def test_overwrite_removes_only_the_files_the_manifest_lists(tmp_path):
    run = tmp_path / "run"
    files = user_folder(run)
    (run / "model" / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    manifest.record(run, run / "model" / "config.json", run / "summary.json", run / "metrics.jsonl")
    assert {p.name for p in manifest.foreign(run)} == {"my_weights.bin", "mine.txt", "eval.json"}
    manifest.remove_owned(run)
    assert not (run / "summary.json").exists() and not (run / "model" / "config.json").exists()
    assert all((run / name).read_text() == text for name, text in files.items())
    assert not (run / manifest.MANIFEST).exists()


def test_output_dir_rules(tmp_path):
    run = tmp_path / "run"
    user_folder(run)
    with pytest.raises(SftError, match="not empty and holds no sft run.*--overwrite"):
        commands.check_output_dir(run, overwrite=False, resume=False)
    with pytest.raises(SftError, match="did not write.*model/my_weights.bin"):
        commands.check_output_dir(run, overwrite=True, resume=False)
    for name in ("model/my_weights.bin", "checkpoints/mine.txt", "eval.json"):
        (run / name).unlink()
    commands.check_output_dir(run, overwrite=True, resume=False)  # only notes.txt left: trains beside it
    commands.check_output_dir(tmp_path / "new", overwrite=False, resume=False)


def test_an_interrupted_run_is_kept_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    saved = checkpoint.save_checkpoint(run / "checkpoints", 7, {"a": torch.zeros(1)}, write_weights)
    manifest.record(run, saved)
    with pytest.raises(SftError, match="interrupted run.*step-00000007.*--resume"):
        commands.check_output_dir(run, overwrite=False, resume=False)
    commands.check_output_dir(run, overwrite=False, resume=True)
    commands.check_output_dir(run, overwrite=True, resume=False)
    assert checkpoint.list_checkpoints(run / "checkpoints") == [saved]  # nothing removed by checking


# -- the run lock ----------------------------------------------------------------------------------------


def _contend(run: str, log: str, start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        with RunLock(Path(run)):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\n")
            time.sleep(0.02)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\n")
    except SftError:
        pass


@pytest.mark.parametrize("stale", ['{"pid": 0}', '{"pid": -1}', '{"pid": "abc"}', "garbage", "[1, 2]", ""])
def test_a_stale_lock_is_taken_over_by_exactly_one_process(tmp_path, stale):
    context = multiprocessing.get_context("fork")
    for trial in range(3):
        run, log = tmp_path / f"run{trial}", tmp_path / f"log{trial}"
        run.mkdir()
        (run / ".sft.lock").write_text(stale)
        assert holder(run) is None
        start = time.time() + 0.3
        workers = [context.Process(target=_contend, args=(str(run), str(log), start)) for _ in range(6)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        inside = 0
        for line in log.read_text().splitlines():
            inside += 1 if line.startswith("in") else -1
            assert inside <= 1, log.read_text()
        assert log.read_text().count("in ") >= 1 and not (run / ".sft.lock").exists()


def test_a_live_lock_is_reported_with_its_holder(tmp_path):
    with RunLock(tmp_path, "finetune"):
        assert holder(tmp_path)["pid"] == os.getpid()
        with pytest.raises(SftError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    assert holder(tmp_path) is None


# -- checkpoints: checksums, fallback, rotation, leftovers --------------------------------------------------


def write_weights(target: Path) -> None:
    from safetensors.torch import save_file

    target.mkdir()
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(target / "weights.safetensors"))


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    first = checkpoint.save_checkpoint(directory, 1, {"a": torch.zeros(1)}, write_weights)
    second = checkpoint.save_checkpoint(directory, 2, {"a": torch.zeros(1)}, write_weights)
    weights = second / "model" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # bit rot: same size, other content
    weights.write_bytes(bytes(data))
    assert "checksum" in checkpoint.checkpoint_problem(second)
    assert checkpoint.find_resume_point(tmp_path, None) == first
    assert "step-00000002 is damaged" in caplog.text
    with pytest.raises(SftError, match="--resume .*step-00000002.*checksum"):
        checkpoint.find_resume_point(tmp_path, str(second))
    weights.write_bytes(bytes(data[:100]))
    assert "truncated" in checkpoint.checkpoint_problem(second)
    (second / "model" / "weights.safetensors").unlink()
    assert "weights.safetensors is missing" in checkpoint.checkpoint_problem(second)
    (first / "trainer_state.pt").write_bytes(b"")
    with pytest.raises(SftError, match="no intact checkpoint"):
        checkpoint.find_resume_point(tmp_path, None)


def test_rotation_and_leftovers_of_killed_writes(tmp_path):
    directory = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(directory, step, {"a": torch.zeros(1)}, write_weights)
    removed = checkpoint.prune_checkpoints(directory, keep=2)
    assert [p.name for p in removed] == ["step-00000001"]
    (directory / ".tmp-step-00000009-abc").mkdir()  # a kill during a checkpoint write
    (directory / ".del-step-00000002").mkdir()  # a kill during rotation
    (tmp_path / ".summary.json.x1y2z3").write_text("{")  # a kill during an atomic write
    (tmp_path / "notes.txt").write_text("mine")
    checkpoint.clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "notes.txt"]


def test_sharded_resume_never_unpickles_code(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from sft_cli.engine.checkpointer import _readable
    from sft_cli.engine.parallel.fsdp import SHARDED_DIR, load_sharded

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state, optim_state = get_state_dict(model, optimizer)
    with pytest.warns(UserWarning):
        dcp.save({"model": state, "optimizer": optim_state}, checkpoint_id=str(tmp_path / SHARDED_DIR))
    other = torch.nn.Linear(3, 2)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=5.0)
    other(torch.randn(4, 3)).sum().backward()
    other_optimizer.step()
    load_sharded(tmp_path, other, other_optimizer)  # a genuine checkpoint loads, settings included
    assert torch.equal(other.weight, model.weight) and other_optimizer.param_groups[0]["lr"] == 1e-3
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SftError, match="cannot be loaded.*not allowed"):
        _readable(tmp_path, lambda: load_sharded(tmp_path, other, other_optimizer))
    assert not marker.exists()


# -- honest status and clean errors when the disk fills or a signal arrives ---------------------------------


def test_disk_full_mid_run_is_a_storage_error_and_the_run_stays_resumable(tiny_recipe, monkeypatch):
    from sft_cli.rundir.metrics_log import MetricLog

    path = tiny_recipe(schedule={"max_steps": 12, "batch_size": 8, "log_every": 2}, output={"save_every": 4})
    original, calls = MetricLog.write, {"n": 0}

    def write(self, record):
        calls["n"] += 1
        if calls["n"] == 4:  # after the step-4 checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        original(self, record)

    monkeypatch.setattr(MetricLog, "write", write)
    with pytest.raises(StorageError, match="metrics.jsonl: No space left on device.*resume: sft finetune r.yaml"):
        commands.train(load_recipe(path), "finetune", resume_command="sft finetune r.yaml --resume")
    run = Path(load_recipe(path).output.dir)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted" and status["resume"].endswith("--resume")
    assert not (run / ".sft.lock").exists()


def test_validation_of_the_tokenizer_train_key(tiny_recipe):
    with pytest.raises(SftError, match="tokenizer.train.*pretrain first"):
        load_recipe(tiny_recipe(tokenizer={"train": True}))
