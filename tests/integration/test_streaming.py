"""data.streaming: documents dealt to shards each once, exact resume after kill -9 (twice), two processes."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sft_cli.data.streaming import BlockStream
from tests.conftest import REPO, read_jsonl, write_recipe

pytestmark = pytest.mark.integration
LINES = (REPO / "data" / "python-docs" / "train.txt").read_text(encoding="utf-8").splitlines()


def write_corpus(folder: Path, lines: list[str], shards: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-len(lines) // shards)
    for k in range(shards):
        with gzip.open(folder / f"part-{k}.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines[k * size : (k + 1) * size]) + "\n")
    return folder


def stream(files: list[Path], seen: list[str] | None = None, **kwargs) -> BlockStream:
    def encode(text: str) -> list[int]:
        if seen is not None:
            seen.append(text)
        return [len(text) % 97] * 7

    settings = dict(block=16, separator=1, batch_size=2, collate=lambda rows: rows, seed=3, buffer=5)
    return BlockStream(files, "text", "text", encode, **{**settings, **kwargs})


def test_every_document_goes_to_exactly_one_shard_per_epoch(tmp_path):
    lines = [f"document {i}" for i in range(101)]  # uneven across 3 shards
    files = sorted(write_corpus(tmp_path / "c", lines, 4).glob("*.gz"))
    per_shard = []
    for shard in range(3):
        seen: list[str] = []
        list(stream(files, seen)._epoch_blocks(0, shard, 3))  # one whole epoch of this shard
        per_shard.append(seen)
    assert [len(docs) for docs in per_shard] == [34, 34, 33]
    union = [d for docs in per_shard for d in docs]
    assert sorted(union) == sorted(lines) and len(set(union)) == len(union)


def test_a_stream_skipping_k_batches_continues_exactly_where_the_full_one_was(tmp_path):
    files = sorted(write_corpus(tmp_path / "c", LINES[:400], 3).glob("*.gz"))
    full = iter(stream(files))
    expected = [next(full) for _ in range(60)]  # several epochs of this small corpus
    resumed = iter(stream(files, skip_batches=23))
    assert [next(resumed) for _ in range(37)] == expected[23:]
    other_rank = iter(stream(files, rank=1, world=2))
    assert next(other_rank) != expected[0]


def lm_recipe(tmp_path: Path, name: str, **schedule) -> Path:
    corpus = write_corpus(tmp_path / "corpus", LINES[:1500], 3)
    values = {
        "name": name,
        "task": "language-modeling",
        "backbone": {"arch": "gpt2", "from_scratch": True, "config": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
        "tokenizer": {"train": True, "vocab_size": 400},
        "data": {"train": str(corpus / "*.txt.gz"), "max_length": 32, "streaming": True, "shuffle_buffer": 20},
        "schedule": {"max_steps": 24, "batch_size": 4, "log_every": 1, "warmup": 0.1, **schedule},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 1},
        "output": {"dir": str(tmp_path / name), "save_every": 4, "keep": 2},
    }
    return write_recipe(tmp_path / f"{name}.yaml", values)


def sft(*args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "sft_cli", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def kill_after_checkpoint(run: Path, process: subprocess.Popen, step: int) -> None:
    from tests.integration.test_schedules_resume import _wait_for_checkpoint

    _wait_for_checkpoint(run, process, step)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_streaming_kill_9_and_resume_twice_gives_the_same_losses(tmp_path):
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    commands.train(load_recipe(lm_recipe(tmp_path, "whole")), "pretrain")  # the uninterrupted run, in-process
    killed = lm_recipe(tmp_path, "killed")
    kill_after_checkpoint(tmp_path / "killed", sft("pretrain", str(killed), wait=False), 8)
    kill_after_checkpoint(tmp_path / "killed", sft("pretrain", str(killed), "--resume", wait=False), 16)
    sft("pretrain", str(killed), "--resume")
    a = [r["loss"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    b = [r["loss"] for r in read_jsonl(tmp_path / "killed" / "metrics.jsonl") if "loss" in r]
    assert len(a) == len(b) == 24
    assert b == pytest.approx(a, abs=1e-6)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["train_tokens"] == 24 * 4 * 32


def test_two_processes_stream_their_own_shards_to_a_token_budget(tmp_path):
    recipe = lm_recipe(tmp_path, "ddp", max_steps=None, max_tokens=6 * 2 * 4 * 32)
    summary = json.loads(sft("pretrain", str(recipe), "--nproc", "2", "--json").stdout.strip().splitlines()[-1])
    assert summary["num_processes"] == 2 and summary["steps"] == 6
    assert summary["train_tokens"] == 6 * 2 * 4 * 32


def test_dataloader_workers_split_the_stream_and_skip_their_own_share(tmp_path):
    from sft_cli.data.streaming import stream_loader

    files = sorted(write_corpus(tmp_path / "c", LINES[:400], 3).glob("*.gz"))
    full = iter(stream_loader(stream(files), num_workers=2))
    expected = [next(full) for _ in range(30)]
    assert len({str(b) for b in expected}) > 20  # two workers, different documents
    resumed = iter(stream_loader(stream(files, skip_batches=13), num_workers=2))
    assert [next(resumed) for _ in range(17)] == expected[13:]
