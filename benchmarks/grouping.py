"""Length grouping on or off, per task: quality and speed over several seeds (evidence for the defaults).

python benchmarks/grouping.py   (writes benchmarks/GROUPING.md; ~10 minutes on 2 CPU cores)
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (benchmarks/run.py: the same recipes and base model as make bench)

SEEDS = (1, 2, 3)


def classification(seed: int, grouped: bool) -> dict:
    values = {
        "task": "classification",
        "backbone": {"name": "minilm-l6"},
        "data": {
            "train": str(bench.TOPICS / "train.jsonl"),
            "eval": str(bench.TOPICS / "test.jsonl"),
            "max_length": 128,
        },
        "optim": {"lr": 1e-4},
        "schedule": {"epochs": 2, "batch_size": 32, "warmup": 0.1, "log_every": 50, "group_by_length": grouped},
        "engine": {"seed": seed},
    }
    return bench.run_sft(f"grouping-cls-{seed}-{grouped}", values, ("accuracy", "macro_f1", "loss"))


def generation(seed: int, grouped: bool) -> dict:
    values = {
        "task": "generation",
        "backbone": {"name": str(bench.WORK / "gen-base"), "from_scratch": True},
        "data": {
            "train": str(bench.NAMES / "train.jsonl"),
            "eval": str(bench.NAMES / "test.jsonl"),
            "template": "{prompt} =>",
            "max_length": 128,
        },
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"epochs": 2, "batch_size": 32, "warmup": 0.05, "log_every": 50, "group_by_length": grouped},
        "engine": {"seed": seed},
        "eval": {"max_new_tokens": 12},
    }
    return bench.run_sft(f"grouping-gen-{seed}-{grouped}", values, ("loss", "exact_match"))


def main() -> None:
    import datasets
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    bench.WORK.mkdir(parents=True, exist_ok=True)
    bench.make_generation_base()
    rows = []
    for task, run, metrics in (
        ("classification", classification, ("accuracy", "macro_f1", "loss")),
        ("generation", generation, ("loss", "exact_match")),
    ):
        for grouped in (True, False):
            results = [run(seed, grouped) for seed in SEEDS]
            means = {m: statistics.mean(r[m] for r in results) for m in (*metrics, "tokens_per_s")}
            spread = {m: statistics.pstdev(r[m] for r in results) for m in metrics}
            rows.append((task, grouped, means, spread))
            print(task, grouped, means, flush=True)
    lines = [
        "# Length grouping on or off",
        "",
        f"Command: `python benchmarks/grouping.py`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {__import__('torch').__version__}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Mean (± population std) over seeds {', '.join(map(str, SEEDS))}; eval on the held-out split.",
        "",
        "| task | group_by_length | eval loss | accuracy / exact match | macro-F1 | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for task, grouped, means, spread in rows:
        quality = "accuracy" if task == "classification" else "exact_match"
        f1 = f"{means['macro_f1']:.4f} ± {spread['macro_f1']:.4f}" if "macro_f1" in means else ""
        lines.append(
            f"| {task} | {grouped} | {means['loss']:.4f} ± {spread['loss']:.4f} | "
            f"{means[quality]:.4f} ± {spread[quality]:.4f} | {f1} | {means['tokens_per_s']:,.0f} |"
        )
    (Path(__file__).parent / "GROUPING.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
