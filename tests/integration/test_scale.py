"""Data at scale: globs, lists, directories and compressed shards; `sft prepare` tokenizes once for every
later run and rank; two processes consume each example of an uneven epoch exactly once."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sft_cli.data.tables import batches_per_rank, epoch_batches, load_table, shard_batches
from sft_cli.errors import SftError
from tests.conftest import REPO, TINY_BERT, keyword_rows, recipe_values, write_jsonl, write_recipe

pytestmark = pytest.mark.integration


def sft(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "sft_cli", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


def last_json(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """53 rows in three shards: gzip-compressed jsonl, plain jsonl, and a nested directory."""
    rows = keyword_rows(53, 3)
    folder = tmp_path / "corpus"
    (folder / "more").mkdir(parents=True)
    with gzip.open(folder / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:20])
    write_jsonl(folder / "b.jsonl", rows[20:40])
    write_jsonl(folder / "more" / "c.jsonl", rows[40:])
    return folder


def test_globs_lists_directories_and_compressed_shards_load_every_row(shards):
    every = [r["text"] for r in keyword_rows(53, 3)]
    assert sorted(load_table(str(shards), "data.train")["text"]) == sorted(every)
    assert len(load_table(str(shards / "*.jsonl*"), "data.train")) == 40
    assert len(load_table(str(shards / "**" / "*.jsonl"), "data.train")) == 33
    listed = load_table([str(shards / "a.jsonl.gz"), str(shards / "more" / "c.jsonl")], "data.train")
    assert len(listed) == 33


def test_data_file_mistakes_are_one_line_errors(shards, tmp_path):
    (shards / "notes.csv").write_text("text,label\nx,y\n")
    with pytest.raises(SftError, match=r"data.train: the files mix formats"):
        load_table(str(shards), "data.train")
    with pytest.raises(SftError, match=r"data.eval: .*nothing-\*.jsonl matches no file"):
        load_table(str(tmp_path / "nothing-*.jsonl"), "data.eval")
    broken = tmp_path / "broken.jsonl.gz"
    with gzip.open(broken, "wt", encoding="utf-8") as f:
        f.write('{"text": "ok", "label": "a"}\n{"text": oops}\n')
    with pytest.raises(SftError, match=r"broken.jsonl.gz line 2 is not valid JSON"):
        load_table(str(broken), "data.train")
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(b'{"text": "a", "label": "b"}\n' * 50)[:40])
    with pytest.raises(SftError, match=r"cut.jsonl.gz could not be decompressed"):
        load_table(str(truncated), "data.train")


def test_compressed_text_corpus_reads_one_example_per_nonblank_line(tmp_path):
    corpus = tmp_path / "c.txt.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write("  first line \n\n\nsecond line\n   \nthird\n")
    assert load_table(str(corpus), "data.train")["text"] == ["first line", "second line", "third"]


def test_sharded_epoch_gives_every_rank_as_many_batches_and_every_example_once():
    rng = random.Random(0)
    for _ in range(2000):
        world, batch = rng.randint(1, 8), rng.randint(1, 16)
        n = rng.randint(world, 400)
        lengths = [rng.randint(1, 50) for _ in range(n)]
        grouped = rng.random() < 0.5  # length grouping puts the short batch anywhere in the epoch
        shards = shard_batches(epoch_batches(lengths, n, batch, rng.randint(0, 9), 0, grouped), world)
        assert {len(s) for s in shards} == {batches_per_rank(n, batch, world)}
        assert sorted(i for s in shards for b in s for i in b) == list(range(n))
        assert all(b for s in shards for b in s)
    with pytest.raises(SftError, match="cannot feed 4 processes"):
        shard_batches([[0, 1, 2]], 4)


def lm_recipe(tmp_path: Path, name: str, **data) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    lines = (REPO / "data" / "python-docs" / "train.txt").read_text(encoding="utf-8").splitlines()[:600]
    for k in range(3):  # three compressed shards, one uneven
        with gzip.open(corpus / f"part-{k}.txt.gz", "wt", encoding="utf-8") as f:
            f.write("\n".join(lines[k * 250 : (k + 1) * 250]))
    values = {
        "name": name,
        "task": "language-modeling",
        "backbone": {"arch": "gpt2", "from_scratch": True, "config": {"n_layer": 1, "n_embd": 32, "n_head": 2}},
        "tokenizer": {"train": True, "vocab_size": 300},
        "data": {"train": str(corpus / "*.txt.gz"), "max_length": 32, **data},
        "schedule": {"max_steps": 2, "batch_size": 4, "log_every": 1},
        "engine": {"device": "cpu", "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs" / name)},
    }
    return write_recipe(tmp_path / f"{name}.yaml", values)


def test_prepare_once_then_runs_on_two_processes_tokenize_nothing(tmp_path):
    recipe = lm_recipe(tmp_path, "prepared", cache_dir=str(tmp_path / "cache"))
    from sft_cli.commands.prepare import prepare
    from sft_cli.config.recipe import load_recipe

    prepared = prepare(load_recipe(recipe))  # `sft prepare`, in this process
    assert prepared["tokenized_rows"] > 0 and prepared["train_examples"] > 0
    assert Path(prepared["cache_dir"]) == tmp_path / "cache"
    for attempt in ("first", "second"):
        summary = last_json(sft("pretrain", str(recipe), "--nproc", "2", "--json", "--overwrite"))
        assert summary["num_processes"] == 2
        assert summary["tokenized_rows_by_rank"] == [0, 0], attempt


def test_a_fresh_cache_is_filled_by_exactly_one_of_two_processes(tmp_path):
    recipe = lm_recipe(tmp_path, "fresh")  # default cache: .sft-cache beside the run directory
    summary = last_json(sft("pretrain", str(recipe), "--nproc", "2", "--json"))
    counts = sorted(summary["tokenized_rows_by_rank"])
    assert counts[0] == 0 and counts[1] > 0
    assert (tmp_path / "runs" / ".sft-cache").is_dir()


def test_two_processes_train_each_example_of_an_uneven_epoch_once(tmp_path):
    from transformers import AutoTokenizer

    from sft_cli.model.backbone import embedded_aliases

    rows = keyword_rows(41, 5)  # 10 full batches of 4 + 1 left over
    train = write_jsonl(tmp_path / "odd.jsonl", rows)
    values = recipe_values(
        tmp_path,
        backbone={"name": "minilm-l6", "from_scratch": True, "config": dict(TINY_BERT)},
        schedule={"epochs": 1, "batch_size": 4, "warmup": 0.0, "log_every": 1},
        output={"dir": str(tmp_path / "run-2")},
    )
    values["data"]["train"] = str(train)
    summary = last_json(sft("finetune", str(write_recipe(tmp_path / "r2.yaml", values)), "--nproc", "2", "--json"))
    assert summary["steps"] == 5  # per rank; the lone last example joins a batch
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_aliases()["minilm-l6"]))
    every_row_once = sum(
        len(ids) for ids in tokenizer([r["text"] for r in rows], truncation=True, max_length=32)["input_ids"]
    )
    assert summary["train_tokens"] == every_row_once  # no example twice, none dropped
