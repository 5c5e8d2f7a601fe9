"""`make bench`: sft against the Hugging Face Trainer on the same model, data and hyperparameters.

Every configuration runs in its own process (so peak RSS is its own), one after another in one go, on
the same machine; the table reports ratios against the Trainer. Results: stdout and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import decoder  # noqa: E402  (the decoder rows: sft vs TRL vs Trainer at a 151,936 vocabulary)
import diffusion  # noqa: E402  (the image-generation row: against diffusers' train_unconditional.py loop)
import encoder_tasks  # noqa: E402  (the encoder-task rows: pairs, regression, multi-label, NER, QA)
import preference  # noqa: E402  (the preference row: DPO against TRL's DPOTrainer)
import seq2seq  # noqa: E402  (the encoder-decoder row: translation against the Seq2SeqTrainer)
import speech  # noqa: E402  (the speech-recognition row: CTC against the Trainer)
import streaming  # noqa: E402  (the streaming rows: peak RSS against corpus size)

WORK = REPO / "benchmarks" / ".work"
TOPICS = REPO / "data" / "stdlib-topics"
NAMES = REPO / "data" / "docstring-names"
COMMON = {"epochs": 2, "batch_size": 32, "lr": 1e-4, "max_length": 128, "seed": 42, "warmup": 0.1, "weight_decay": 0.01}
TINY_GPT = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}
GEN = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "max_length": 128, "seed": 42, "warmup": 0.05, "weight_decay": 0.0}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- classification -----------------------------------------------------------------------------


def run_sft(name: str, values: dict, quality: tuple[str, ...], command: str = "finetune") -> dict:
    """Write the recipe, train and evaluate through sft's own commands; throughput + the named metrics."""
    import yaml

    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    recipe_path = WORK / f"{name}.yaml"
    recipe_path.write_text(
        yaml.safe_dump({"name": name, **values, "output": {"dir": str(WORK / name), "keep_best": False}})
    )
    recipe = load_recipe(recipe_path)
    summary = commands.train(recipe, command, overwrite=True)
    metrics = commands.evaluate_model(recipe)
    result = {key: summary[key] for key in ("tokens_per_s", "train_seconds", "train_tokens")}
    return {**result, **{key: metrics[key] for key in quality}, "mfu": summary.get("mfu")}


def sft_classification(name: str) -> dict:
    values = {
        "task": "classification",
        "backbone": {"name": "minilm-l6"},
        "data": {
            "train": str(TOPICS / "train.jsonl"),
            "eval": str(TOPICS / "test.jsonl"),
            "max_length": COMMON["max_length"],
        },
        "optim": {"lr": COMMON["lr"], "weight_decay": COMMON["weight_decay"]},
        "schedule": {
            "epochs": COMMON["epochs"],
            "batch_size": COMMON["batch_size"],
            "warmup": COMMON["warmup"],
            "log_every": 50,
        },
        "engine": {"seed": COMMON["seed"], "precision": "fp32" if name.endswith("fp32") else "auto"},
    }
    return run_sft(name, values, ("accuracy", "macro_f1"))


def trainer_classification(name: str) -> dict:
    import numpy as np
    import torch
    from datasets import load_dataset
    from sklearn.metrics import accuracy_score, f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from sft_cli.model.backbone import embedded_aliases

    path = str(embedded_aliases()["minilm-l6"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_dataset("json", data_files={"train": str(TOPICS / "train.jsonl"), "test": str(TOPICS / "test.jsonl")})
    labels = sorted(set(raw["train"]["label"]))
    label2id = {n: i for i, n in enumerate(labels)}

    def encode(rows):
        enc = tokenizer(rows["text"], truncation=True, max_length=COMMON["max_length"])
        enc["labels"] = [label2id[v] for v in rows["label"]]
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    data = raw.map(encode, batched=True, remove_columns=["text", "label"])
    torch.manual_seed(COMMON["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    best = name.endswith("best")
    args = TrainingArguments(
        output_dir=str(WORK / name),
        per_device_train_batch_size=COMMON["batch_size"],
        per_device_eval_batch_size=64,
        num_train_epochs=COMMON["epochs"],
        learning_rate=COMMON["lr"],
        weight_decay=COMMON["weight_decay"],
        warmup_steps=COMMON["warmup"],
        seed=COMMON["seed"],
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=best,
        train_sampling_strategy="group_by_length" if best else "random",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data["train"], data_collator=DataCollatorWithPadding(tokenizer)
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    output = trainer.predict(data["test"])
    predictions = np.argmax(output.predictions, -1)
    tokens = sum(data["train"]["length"]) * COMMON["epochs"]
    return {
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "train_tokens": tokens,
        "accuracy": float(accuracy_score(output.label_ids, predictions)),
        "macro_f1": float(f1_score(output.label_ids, predictions, average="macro")),
    }


# ---- generation ---------------------------------------------------------------------------------


def sft_generation(name: str) -> dict:
    values = {
        "task": "generation",
        "backbone": {"name": str(WORK / "gen-base"), "from_scratch": True},
        "data": {
            "train": str(NAMES / "train.jsonl"),
            "eval": str(NAMES / "test.jsonl"),
            "template": "{prompt} =>",
            "max_length": GEN["max_length"],
            "packing": name.endswith("packed"),
        },
        "optim": {"lr": GEN["lr"], "weight_decay": GEN["weight_decay"]},
        "schedule": {
            "epochs": GEN["epochs"],
            "group_by_length": not name.endswith("ungrouped"),
            "batch_size": GEN["batch_size"] // (4 if name.endswith("packed") else 1),
            "warmup": GEN["warmup"],
            "log_every": 50,
        },
        "engine": {"seed": GEN["seed"]},
        "eval": {"max_new_tokens": 12},
    }
    return run_sft(name, values, ("loss", "exact_match"))


def trainer_generation(name: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(WORK / "gen-base")
    raw = load_dataset("json", data_files={"train": str(NAMES / "train.jsonl"), "test": str(NAMES / "test.jsonl")})

    def encode(rows):
        texts = [f"{p} =>{r}{tokenizer.eos_token}" for p, r in zip(rows["prompt"], rows["response"])]
        enc = tokenizer(texts, truncation=True, max_length=GEN["max_length"])
        enc["length"] = [len(x) for x in enc["input_ids"]]
        return enc

    data = raw.map(encode, batched=True, remove_columns=["prompt", "response"])
    torch.manual_seed(GEN["seed"])
    model = AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.from_pretrained(WORK / "gen-base"))
    args = TrainingArguments(
        output_dir=str(WORK / name),
        per_device_train_batch_size=GEN["batch_size"],
        num_train_epochs=GEN["epochs"],
        learning_rate=GEN["lr"],
        weight_decay=GEN["weight_decay"],
        warmup_steps=GEN["warmup"],
        seed=GEN["seed"],
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], data_collator=collator
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(data["train"]["length"]) * GEN["epochs"]
    return {
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "train_tokens": tokens,
        "eval_loss_all_tokens": trainer.evaluate()["eval_loss"],
    }


def make_generation_base() -> None:
    """A tokenizer trained on the docs corpus + a 4-layer GPT-2 config, shared by every generation run."""
    from transformers import AutoConfig

    from sft_cli.data.tables import load_table
    from sft_cli.tasks.text import train_bpe_tokenizer

    base = WORK / "gen-base"
    if (base / "config.json").exists():
        return
    texts = load_table(str(REPO / "data" / "python-docs" / "train.txt"), "bench")["text"]
    tokenizer = train_bpe_tokenizer(texts, 4000)
    config = AutoConfig.for_model(
        "gpt2",
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_GPT,
    )
    base.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(base)
    config.save_pretrained(base)
    (base / "model.safetensors").write_text("")  # sft's from_scratch path only reads the config


RUNS = {
    "cls/trainer-default": trainer_classification,
    "cls/trainer-best": trainer_classification,
    "cls/sft": sft_classification,
    "cls/sft-fp32": sft_classification,
    "gen/trainer-clm-collator": trainer_generation,
    "gen/sft-padded-ungrouped": sft_generation,
    "gen/sft-padded": sft_generation,
    "gen/sft-packed": sft_generation,
    "dec/trainer-clm-collator": decoder.trainer_run,
    "dec/trl-sfttrainer": decoder.trl_run,
    "dec/sft": decoder.sft_run,
    "dec/sft-seed2": decoder.sft_run,
    "dec512/trl-sfttrainer": decoder.trl_run,
    "dec512/sft": decoder.sft_run,
    "stream/sft-1x-streaming": streaming.pretrain_run,
    "stream/sft-10x-streaming": streaming.pretrain_run,
    "stream/sft-10x-in-memory": streaming.pretrain_run,
    "pairs/trainer-run-glue": encoder_tasks.trainer_pairs,
    "pairs/sft": encoder_tasks.sft_pairs,
    "reg/trainer-run-glue": encoder_tasks.trainer_regression,
    "reg/sft": encoder_tasks.sft_regression,
    "mlc/trainer-run-glue": encoder_tasks.trainer_multi_label,
    "mlc/sft": encoder_tasks.sft_multi_label,
    **{
        f"mlc/{side}-seed{seed}": run
        for seed in encoder_tasks.MLC_SEEDS[1:]
        for side, run in (
            ("trainer-run-glue", encoder_tasks.trainer_multi_label),
            ("sft", encoder_tasks.sft_multi_label),
        )
    },
    "ner/trainer-run-ner": encoder_tasks.trainer_ner,
    "ner/sft": encoder_tasks.sft_ner,
    "qa/trainer-run-qa": encoder_tasks.trainer_qa,
    "qa/sft": encoder_tasks.sft_qa,
    **seq2seq.RUNS,
    **speech.RUNS,
    **diffusion.RUNS,
    **preference.RUNS,
}


def run_one(name: str) -> None:
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.disable(logging.WARNING)
    WORK.mkdir(parents=True, exist_ok=True)
    if name.startswith("dec/") and name.endswith("seed2"):
        decoder.RUN["seed"] = 2  # the same run with another data order: the noise floor of the eval loss
    if name.startswith("dec512/"):
        decoder.RUN.update(decoder.SHORT_ROWS)
    result = RUNS[name](name.replace("/", "-"))
    result["peak_rss_mb"] = peak_rss_mb()
    if name.startswith(diffusion.PREFIXES):
        result = diffusion.finish(result)
    if name.startswith(preference.PREFIXES):
        result = preference.finish(result)
    if "model" in result:  # decoder rows: one evaluator for every trained model, after peak RSS was read
        result["eval_loss"] = decoder.held_out_loss(result.pop("model"))
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated prefixes (cls, gen, dec, dec512, stream, pairs, reg, mlc, ner, qa, s2s, asr, diff, pref); "
        "encoder = pairs, reg, mlc, ner and qa",
    )
    args = parser.parse_args()
    if args.one:
        return run_one(args.one)
    WORK.mkdir(parents=True, exist_ok=True)
    prefixes = [q for p in args.only.split(",") if p for q in (encoder_tasks.PREFIXES if p == "encoder" else [p])]
    selected = [name for name in RUNS if not prefixes or any(name.startswith(p) for p in prefixes)]
    if any(name.startswith(("gen/", "stream/")) for name in selected):
        make_generation_base()
    if any(name.startswith("dec") for name in selected):
        decoder.make_base()
    if any(name.startswith(seq2seq.PREFIXES) for name in selected):
        seq2seq.make_base()
    if any(name.startswith(speech.PREFIXES) for name in selected):
        speech.make_base()
    if any(name.startswith(diffusion.PREFIXES) for name in selected):
        diffusion.make_base()
    if any(name.startswith(preference.PREFIXES) for name in selected):
        preference.make_base()
    results: dict = {}
    for name in selected:
        print(f"running {name} ...", flush=True)
        done = subprocess.run(
            [sys.executable, __file__, "--one", name],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not line:
            print(done.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        results[name] = json.loads(line[0][7:])
        print(f"  {results[name]}", flush=True)
    if prefixes and all(p.split("/")[0] + "/" in encoder_tasks.PREFIXES for p in prefixes) and not encoder_tasks.SMOKE:
        # encoder rows alone: merge them into the last encoder rows and rewrite that section of RESULTS.md only
        saved = REPO / "benchmarks" / "encoder-results.json"  # committed: a later partial run merges into it
        merged = {**(json.loads(saved.read_text()) if saved.exists() else {}), **results}
        saved.write_text(json.dumps(merged))
        lines = encoder_tasks.encoder_report(merged)
        lines[3:3] = ["Rows merged from the encoder-only runs; the latest: " + machine_line(f"--only {args.only}"), ""]
        encoder_tasks.replace_section(REPO / "benchmarks" / "RESULTS.md", lines, "## Encoder tasks")
        print("\n".join(encoder_tasks.encoder_report(merged)))
        return
    for module, heading, what in SECTION_ROWS:
        if prefixes and all(p.split("/")[0] + "/" in module.PREFIXES for p in prefixes) and not module.SMOKE:
            # these rows alone: kept in <row>-results.json, their section of RESULTS.md rewritten
            saved = REPO / "benchmarks" / f"{module.__name__}-results.json"
            merged = {**(json.loads(saved.read_text()) if saved.exists() else {}), **results}
            saved.write_text(json.dumps(merged))
            lines = module.report(merged)
            lines[3:3] = [
                f"Rows merged from the {what}-only runs; the latest: " + machine_line(f"--only {args.only}"),
                "",
            ]
            encoder_tasks.replace_section(REPO / "benchmarks" / "RESULTS.md", lines, heading)
            print("\n".join(lines))
            return
    # a partial run (or a smoke run): show it against the last full run's other rows, never write RESULTS.md
    if args.only or encoder_tasks.SMOKE:
        saved = json.loads((WORK / "results.json").read_text()) if (WORK / "results.json").exists() else {}
        print(json.dumps({**saved, **results}, indent=1))
        print("\n".join(encoder_tasks.encoder_report(results)))
        return
    (WORK / "results.json").write_text(json.dumps(results))
    write_report(results)


# rows whose section of RESULTS.md a run of them alone rewrites (module, section heading, what they are)
SECTION_ROWS = (
    (seq2seq, "## Encoder-decoder", "encoder-decoder"),
    (speech, "## Speech recognition", "speech"),
    (diffusion, "## Image generation", "image-generation"),
    (preference, "## Preference tuning", "preference"),
)


def machine_line(flags: str = "") -> str:
    """Which command, machine, library versions and time produced a table."""
    import transformers

    command = f"python benchmarks/run.py {flags}".strip()
    return (
        f"Command: `{command}`. Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.platform()}, torch {__import__('torch').__version__}, transformers {transformers.__version__}. "
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}."
    )


def write_report(results: dict) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Command: `make bench` (python benchmarks/run.py). Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.platform()}, torch {__import__('torch').__version__}, "
        f"transformers {__import__('transformers').__version__}. Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "Same backbone, data, epochs, batch size, learning rate, max length and seed for every row; each row ran in its own",
        "process, one after another in this run. tokens/s counts non-padding training tokens.",
        "",
    ]
    cls = {k: v for k, v in results.items() if k.startswith("cls/")}
    if cls:
        default, best = cls.get("cls/trainer-default"), cls.get("cls/trainer-best")
        lines += [
            "## Text classification (packaged MiniLM, data/stdlib-topics, 2 epochs)",
            "",
            "| run | tokens/s | × Trainer default | × Trainer best | wall s | peak RSS MB | RSS × default | accuracy | macro-F1 | MFU |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in cls.items():
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / default['tokens_per_s']:.2f} | "
                f"{r['tokens_per_s'] / best['tokens_per_s']:.2f} | {r['train_seconds']:.1f} | {r['peak_rss_mb']:,.0f} | "
                f"{r['peak_rss_mb'] / default['peak_rss_mb']:.2f} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                f"{'' if r.get('mfu') is None else format(r['mfu'], '.1%')} |"
            )
        lines.append("")
    gen = {k: v for k, v in results.items() if k.startswith("gen/")}
    if gen:
        ref = gen.get("gen/trainer-clm-collator")
        padded = gen.get("gen/sft-padded")
        lines += [
            "## Generative SFT (4-layer GPT-2 from scratch, data/docstring-names, 2 epochs)",
            "",
            "| run | tokens/s | × Trainer | × sft padded | wall s | peak RSS MB | eval loss (response tokens) | exact match |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in gen.items():
            loss = r.get("loss")
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
                f"{r['tokens_per_s'] / padded['tokens_per_s']:.2f} | {r['train_seconds']:.1f} | {r['peak_rss_mb']:,.0f} | "
                f"{'' if loss is None else format(loss, '.4f')} | {'' if 'exact_match' not in r else format(r['exact_match'], '.3f')} |"
            )
        lines += [
            "",
            "`sft-padded-ungrouped` pads random batches (no length grouping): the case packing is meant to fix. With",
            "length grouping (sft's default) padding is already small, and packed rows pay for longer attention spans.",
            "",
            "The Trainer's causal-LM collator trains on prompt and response tokens alike (its eval loss covers all "
            f"tokens: {ref.get('eval_loss_all_tokens', float('nan')):.4f}); sft trains on response tokens only.",
        ]
    lines += encoder_tasks.encoder_report(results)
    lines += seq2seq.report(results)
    lines += speech.report(results)
    lines += diffusion.report(results)
    lines += preference.report(results)
    lines += decoder_report(results)
    lines += streaming.streaming_report(results)
    text = "\n".join(lines) + "\n"
    print(text)
    (REPO / "benchmarks" / "RESULTS.md").write_text(text)


def decoder_report(results: dict) -> list[str]:
    """The decoder sections (1024- and 512-token rows): ratios against TRL and the Trainer, the shared held-out loss."""
    lines: list[str] = []
    for prefix, shape in (("dec/", {}), ("dec512/", decoder.SHORT_ROWS)):
        dec = {k: v for k, v in results.items() if k.startswith(prefix)}
        if dec:
            lines += _decoder_table(dec, {**decoder.RUN, **shape}, prefix)
    return lines


def _decoder_table(dec: dict, run: dict, prefix: str) -> list[str]:
    trl, trainer = dec.get(f"{prefix}trl-sfttrainer"), dec.get(f"{prefix}trainer-clm-collator")
    lines = [
        "",
        f"## Chat SFT of a Qwen2-style decoder with a 151,936-token vocabulary: {run['rows']} × {run['max_length']}-token "
        f"rows (data/stdlib-chat, {run['steps']} steps)",
        "",
        f"4 layers, hidden 256, GQA 4/2 heads, untied embeddings (81M parameters, 78M of them the vocabulary); "
        f"{run['rows']} × {run['max_length']}-token packed rows per step for sft and TRL"
        + (f", {run['trainer_batch']} padded conversations for the Trainer" if trainer else "")
        + f"; LR {run['lr']} constant, bf16 autocast, seed {run['seed']}. Loss on assistant replies for sft and TRL "
        "(`assistant_only_loss`)" + (", on every token for the Trainer" if trainer else "") + ". Held-out loss: one "
        "evaluator scores every trained model on the assistant tokens of data/stdlib-chat/test.jsonl.",
        "",
        "| run | tokens/s | × TRL | × Trainer | train s | peak RSS MB | RSS × TRL | held-out loss | Δ vs TRL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(row: dict, ref: dict | None, key: str) -> str:
        return f"{row[key] / ref[key]:.2f}" if ref else ""

    for name, r in dec.items():
        delta = f"{r['eval_loss'] - trl['eval_loss']:+.3f}" if trl else ""
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {ratio(r, trl, 'tokens_per_s')} | {ratio(r, trainer, 'tokens_per_s')} | "
            f"{r['train_seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {ratio(r, trl, 'peak_rss_mb')} | {r['eval_loss']:.4f} | {delta} |"
        )
    return lines


if __name__ == "__main__":
    main()
