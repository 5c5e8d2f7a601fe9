"""The preference row of `make bench`: DPO with sft against TRL's DPOTrainer (the pinned trl).

Both sides: the same chat model with a realistic 151,936-token vocabulary (decoder.py's Qwen2 shape, first
chat-tuned by sft on data/stdlib-chat so its replies mean something), the same pairs (data/stdlib-prefs), steps,
batch, learning rate, beta and bf16 autocast; each run in its own process. TRL runs twice: as it comes (a frozen
reference copy scored every step) and with `precompute_ref_log_probs` (its memory-saving mode). Every trained
model is scored by one evaluator — sft's preference eval on the held-out pairs, reference = the starting model —
so reward accuracies compare. Tokens/s counts, for every side, the tokens of both sides of each pair with its
prompt (2 x prompt + chosen + rejected) over the training wall time, the reference pass included.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import decoder
import encoder_tasks

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"
PREFS = REPO / "data" / "stdlib-prefs"
SMOKE = os.environ.get("SFT_BENCH_SMOKE") == "1"
BASE = WORK / ("pref-base-smoke" if SMOKE else "pref-base")
PREFIXES = ("pref/",)
RUN = {"pairs": 256, "batch": 8, "lr": 5e-4, "beta": 0.1, "max_length": 256, "eval_pairs": 235}
BASE_SFT = {"max_steps": 60, "rows": 4, "max_length": 512, "lr": 2e-3}
SEEDS = (42, 2)  # two seeds a side (the pairs' order), runs alternating: the machine's speed drifts


def seed_of(name: str) -> int:
    return encoder_tasks.seed_of(name, SEEDS[0])


def train_pairs() -> Path:
    """The first RUN['pairs'] training pairs (one epoch for every side)."""
    path = WORK / "pref-train.jsonl"
    if not path.exists():
        lines = (PREFS / "train.jsonl").read_text(encoding="utf-8").splitlines()[: RUN["pairs"]]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_base() -> None:
    """decoder.py's 151,936-vocabulary Qwen2, chat-tuned by sft for a few steps (saved once)."""
    if (BASE / "config.json").exists():
        return
    decoder.make_base()
    values = {
        "name": "pref-base",
        "task": "generation",
        "backbone": {"name": str(decoder.BASE)},
        "data": {
            "train": str(decoder.CHAT / "train.jsonl"),
            "chat_template": "chatml",
            "max_length": BASE_SFT["max_length"],
            "packing": True,
        },
        "optim": {"lr": BASE_SFT["lr"], "weight_decay": 0.0},
        "schedule": {"max_steps": 2 if SMOKE else BASE_SFT["max_steps"], "batch_size": BASE_SFT["rows"], "warmup": 0.1},
        "engine": {"seed": 42, "attention": "sdpa", "precision": "bf16"},
        "output": {"dir": str(WORK / f"{BASE.name}-run"), "keep_best": False},
    }
    _train_with_sft(values, BASE.name)
    import shutil

    shutil.copytree(WORK / f"{BASE.name}-run" / "model", BASE)


def _train_with_sft(values: dict, name: str) -> dict:
    import yaml

    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return commands.train(load_recipe(path), "finetune", overwrite=True)


def pair_tokens() -> int:
    """2 x prompt + chosen + rejected tokens over the training pairs, as sft tokenizes them (the same count is
    used for every side, so tokens/s ratios are wall-time ratios)."""
    from sft_cli.chat.masks import ChatEncoder
    from sft_cli.chat.templates import prepare_tokenizer
    from sft_cli.config.schema import Recipe
    from sft_cli.tasks.preference_data import PairEncoder
    from sft_cli.tasks.text import load_tokenizer

    recipe = Recipe()
    recipe.data.max_length = RUN["max_length"]
    tokenizer = load_tokenizer(str(BASE), recipe.backbone)
    encoder = PairEncoder(
        tokenizer, recipe.data, ChatEncoder(tokenizer, prepare_tokenizer(tokenizer, "chatml", ""), "last")
    )
    total = 0
    for line in train_pairs().read_text(encoding="utf-8").splitlines()[: SMOKE_PAIRS if SMOKE else None]:
        prompt, chosen, rejected = encoder.encode(json.loads(line))
        total += 2 * len(prompt) + len(chosen) + len(rejected)
    return total


SMOKE_PAIRS = 16


def steps() -> int:
    return (SMOKE_PAIRS if SMOKE else RUN["pairs"]) // RUN["batch"]


def fresh(directory: Path) -> Path:
    """An empty directory (a previous run's cache removed)."""
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    return directory


def sft_run(name: str) -> dict:
    values = {
        "name": name,
        "task": "preference",
        "backbone": {"name": str(BASE)},
        "data": {
            "train": str(train_pairs()),
            "chat_template": "chatml",
            "max_length": RUN["max_length"],
            "cache_dir": str(fresh(WORK / f"{name}-cache")),  # every run computes its own reference pass
        },
        "loss": {"preference": "dpo", "beta": RUN["beta"]},
        "optim": {"lr": RUN["lr"], "weight_decay": 0.0},
        "schedule": {
            "max_steps": steps(),
            "batch_size": RUN["batch"],
            "warmup": 0.0,
            "scheduler": "constant",
            "log_every": 8,
        },
        "engine": {"seed": seed_of(name), "attention": "sdpa", "precision": "bf16"},
        "output": {"dir": str(WORK / name), "keep_best": False},
    }
    start = time.perf_counter()
    summary = _train_with_sft(values, name)
    seconds = summary["train_seconds"] + summary["preference"]["reference_seconds"]
    return {
        "train_seconds": seconds,
        "reference_seconds": summary["preference"]["reference_seconds"],
        "wall_seconds": time.perf_counter() - start,
        "model": str(WORK / name / "model"),
    }


def trl_run(name: str, precompute: bool = False) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(train_pairs()), split="train")
    if SMOKE:
        data = data.select(range(SMOKE_PAIRS))
    config = DPOConfig(
        output_dir=str(WORK / name),
        per_device_train_batch_size=RUN["batch"],
        max_steps=steps(),
        learning_rate=RUN["lr"],
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        seed=seed_of(name),
        bf16=True,
        use_cpu=True,
        logging_steps=8,
        save_strategy="no",
        report_to=[],
        beta=RUN["beta"],
        max_length=RUN["max_length"],
        precompute_ref_log_probs=precompute,
    )
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    begin = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - begin
    trainer.save_model(str(WORK / name / "model"))
    tokenizer.save_pretrained(str(WORK / name / "model"))
    return {"train_seconds": seconds, "wall_seconds": time.perf_counter() - start, "model": str(WORK / name / "model")}


def trl_precompute_run(name: str) -> dict:
    return trl_run(name, precompute=True)


def finish(result: dict) -> dict:
    """After peak RSS was read: tokens/s, and reward accuracy from the one evaluator, held out and on the training
    pairs (how far each side got on its own objective)."""
    result["tokens_per_s"] = pair_tokens() / result["train_seconds"]
    model = result.pop("model")
    result.update(rewards(model, PREFS / "test.jsonl"))
    result.update({f"train_{k}": v for k, v in rewards(model, train_pairs()).items()})
    return result


def rewards(model_dir: str, pairs: Path) -> dict:
    """sft's preference eval of a trained model on (the first RUN['eval_pairs'] of) `pairs`, against the starting
    model (fp32)."""
    from sft_cli.config.recipe import load_recipe
    from sft_cli.engine.accelerator import make_accelerator
    from sft_cli.engine.evaluation import evaluate_over_processes
    from sft_cli.tasks.registry import build_task

    test = WORK / f"pref-score-{pairs.stem}.jsonl"
    lines = pairs.read_text(encoding="utf-8").splitlines()[: RUN["eval_pairs"]]
    test.write_text("\n".join(lines[: SMOKE_PAIRS if SMOKE else None]) + "\n", encoding="utf-8")
    path = WORK / "pref-held-out.yaml"
    values = {
        "task": "preference",
        "backbone": {"name": str(BASE)},
        "data": {"train": str(test), "eval": str(test), "chat_template": "chatml", "max_length": RUN["max_length"]},
        "loss": {"beta": RUN["beta"]},
        "engine": {"precision": "fp32"},
        "output": {"dir": str(WORK / "pref-held-out")},
    }
    path.write_text(json.dumps(values))
    recipe = load_recipe(path)
    accelerator = make_accelerator(recipe.engine)
    task = build_task(recipe)
    task.setup(model_dir=model_dir, train=False)
    metrics = evaluate_over_processes(task, task.model, accelerator, 32, final=False)
    return {key: metrics[key] for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")}


SIDES = {"pref/trl-dpotrainer": trl_run, "pref/sft": sft_run}
# TRL's precompute mode once (seed 42): it trades TRL's speed for memory, the row shows how much
RUNS = {
    **SIDES,
    "pref/trl-precompute": trl_precompute_run,
    **{f"{name}-seed{seed}": run for seed in SEEDS[1:] for name, run in SIDES.items()},
}


def report(results: dict) -> list[str]:
    """The RESULTS.md section: sft and TRL's DPOTrainer side by side, sft's speed and memory as ratios."""
    rows = {k: v for k, v in results.items() if k.startswith(PREFIXES)}
    if not rows:
        return []
    lines = [
        "",
        "## Preference tuning: DPO (151,936-token vocabulary)",
        "",
        f"Both sides: decoder.py's Qwen2-shaped model (4 layers, hidden 256, untied 151,936-token embeddings, 81M "
        f"parameters) chat-tuned by sft for {BASE_SFT['max_steps']} steps on data/stdlib-chat, then DPO (sigmoid "
        f"loss, beta {RUN['beta']}) on the first {RUN['pairs']} pairs of data/stdlib-prefs (ChatML conversations), "
        f"batch {RUN['batch']}, {RUN['pairs'] // RUN['batch']} steps (one epoch), AdamW LR {RUN['lr']} constant, no "
        f"weight decay, max length {RUN['max_length']}, bf16 autocast, seeds {', '.join(map(str, SEEDS))} on each "
        "side (runs alternate). TRL's DPOTrainer runs as it comes (a frozen reference copy scored every step) and "
        "with `precompute_ref_log_probs=True`; sft with its defaults (reference precomputed, pairs packed after "
        "one shared prompt, chunked log-probabilities). Tokens/s: 2 x prompt + chosen + rejected tokens per pair "
        "over the training wall time (reference pass included), the same count for every side. One evaluator "
        f"scores every trained model: sft's preference eval on the {RUN['eval_pairs']} held-out pairs, and on the "
        f"first {RUN['eval_pairs']} training pairs, against the starting model (fp32). × peer: against TRL's "
        "DPOTrainer run of the same seed. The base had 60 steps of SFT: held-out reward accuracy stays near chance "
        "for both tools at this budget; the training pairs show each optimizing its objective.",
        "",
        "| run | pair tokens/s | × peer | train s | peak RSS MB | × peer | held-out reward accuracy | held-out margin "
        "| train-pair reward accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sides = (*SIDES, "pref/trl-precompute")
    quality = (("reward_accuracy", ".3f", True), ("reward_margin", ".3f", True), ("train_reward_accuracy", ".3f", True))
    lines += encoder_tasks.seeded_rows(rows, "pref/trl-dpotrainer", sides, seed_of, "tokens_per_s", ",.0f", quality)
    return lines
