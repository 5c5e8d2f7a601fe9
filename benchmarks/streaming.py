"""The streaming rows of `make bench`: peak RSS of `sft pretrain` on a corpus and on one 10x larger, same steps.

With `data.streaming: true` memory must not grow with the corpus; the in-memory row (the default) on the 10x
corpus shows what streaming saves. The corpus is data/python-docs repeated, in gzip-compressed shards.
"""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"
RUN = {"steps": 30, "batch_size": 8, "max_length": 128, "seed": 42, "base_copies": 2}


def make_corpus(scale: int) -> Path:
    """`base_copies * scale` copies of the docs corpus in 4 gzip shards (written once)."""
    folder = WORK / f"corpus-{scale}x"
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    text = (REPO / "data" / "python-docs" / "train.txt").read_text(encoding="utf-8")
    copies = RUN["base_copies"] * scale
    for shard in range(4):
        with gzip.open(folder / f"part-{shard}.txt.gz", "wt", encoding="utf-8", compresslevel=1) as f:
            for _ in range(copies // 4 + (1 if shard < copies % 4 else 0)):
                f.write(text)
    (folder / "done").write_text("")
    return folder


def corpus_mb(scale: int) -> float:
    """Uncompressed size of a corpus in MB."""
    size = (REPO / "data" / "python-docs" / "train.txt").stat().st_size
    return size * RUN["base_copies"] * scale / 2**20


def pretrain_run(name: str) -> dict:
    """`sft pretrain` of the benchmark's 4-layer GPT-2 (its 4k tokenizer) for RUN['steps'] steps."""
    import yaml

    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    scale = 10 if "-10x" in name else 1
    streaming = name.endswith("streaming")
    corpus = make_corpus(scale)
    values = {
        "name": name,
        "task": "language-modeling",
        "objective": "clm",
        "backbone": {"name": str(WORK / "gen-base"), "from_scratch": True},
        "data": {"train": str(corpus / "*.txt.gz"), "max_length": RUN["max_length"], "streaming": streaming},
        "schedule": {"max_steps": RUN["steps"], "batch_size": RUN["batch_size"], "log_every": 10},
        "engine": {"seed": RUN["seed"]},
        "output": {"dir": str(WORK / name), "keep_best": False},
    }
    values["data"]["cache_dir"] = str(WORK / f"{name}-cache")  # per row: each tokenizes, as a first run does
    recipe_path = WORK / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(values))
    summary = commands.train(load_recipe(recipe_path), "pretrain", overwrite=True)
    return {
        "corpus_mb": round(corpus_mb(scale), 1),
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "train_tokens": summary["train_tokens"],
        "final_train_loss": summary["final_train_loss"],
    }


def streaming_report(results: dict) -> list[str]:
    """The RESULTS.md section: peak RSS per corpus size, and the 10x/1x ratio streaming must keep near 1."""
    rows = {k: v for k, v in results.items() if k.startswith("stream/")}
    if not rows:
        return []
    small = rows.get("stream/sft-1x-streaming")
    lines = [
        "",
        f"## Streaming pretraining (4-layer GPT-2, {RUN['steps']} steps of {RUN['batch_size']} x {RUN['max_length']} "
        "tokens, gzip shards of data/python-docs repeated)",
        "",
        "| run | corpus MB (uncompressed) | peak RSS MB | RSS × 1x streaming | tokens/s | wall s (train) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ratio = f"{row['peak_rss_mb'] / small['peak_rss_mb']:.2f}" if small else ""
        lines.append(
            f"| {name} | {row['corpus_mb']:,.1f} | {row['peak_rss_mb']:,.0f} | {ratio} | "
            f"{row['tokens_per_s']:,.0f} | {row['train_seconds']:.1f} |"
        )
    lines += [
        "",
        "Streaming reads records as they are trained on (plus the shuffle buffer), so its memory does not follow the",
        "corpus; the in-memory row parses and tokenizes the whole corpus into Arrow tables first.",
    ]
    return lines
