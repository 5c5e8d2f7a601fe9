"""The decoder row of `make bench`: chat SFT of a Qwen2-style model with a realistic 151,936-token vocabulary.

sft vs TRL's SFTTrainer (its best settings: BFD packing, padding-free, assistant-only loss, bf16) vs the
transformers Trainer (causal-LM collator), on the same saved model, data (data/stdlib-chat), steps, batch
tokens, LR and seed; each in its own process. Every trained model is then scored by one evaluator on the same
held-out assistant tokens, so the eval losses compare.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"
CHAT = REPO / "data" / "stdlib-chat"
BASE = WORK / "decoder-base-untied"
QWEN2 = {  # Qwen2-0.5B's vocabulary and attention shape at a size a 2-core CPU can train; embeddings untied, so
    # the vocabulary is 78M of the 81M parameters (two 151,936 x 256 matrices, each with its gradient and moments)
    "vocab_size": 151936,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
RUN = {"steps": 20, "rows": 2, "max_length": 1024, "lr": 2e-3, "seed": 42, "trainer_batch": 22}
SHORT_ROWS = {"rows": 4, "max_length": 512}  # the dec512/ rows: the same tokens per step as 4 x 512-token rows
# ChatML whose assistant replies (with <|im_end|>) sit in {% generation %} markers: what TRL's
# assistant_only_loss needs; sft's built-in chatml renders the same text (tests/unit/test_chat_masks.py).
MARKED_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
    "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_base() -> None:
    """A 4k BPE tokenizer (+ ChatML tokens) and a random Qwen2 model with a 151,936 vocabulary, saved once."""
    if (BASE / "config.json").exists():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_cli.data.tables import load_table
    from sft_cli.tasks.text import train_bpe_tokenizer

    texts = load_table(str(REPO / "data" / "python-docs" / "train.txt"), "bench")["text"]
    tokenizer = train_bpe_tokenizer(texts, 4000)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = MARKED_CHATML
    config = AutoConfig.for_model(
        "qwen2",
        **QWEN2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(RUN["seed"])
    AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").save_pretrained(BASE)
    tokenizer.save_pretrained(BASE)


def sft_run(name: str) -> dict:
    import yaml

    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    values = {
        "name": name,
        "task": "generation",
        "backbone": {"name": str(BASE)},
        "data": {
            "train": str(CHAT / "train.jsonl"),
            "chat_template": "chatml",
            "max_length": RUN["max_length"],
            "packing": True,
        },
        "optim": {"lr": RUN["lr"], "weight_decay": 0.0},
        "schedule": {
            "max_steps": RUN["steps"],
            "batch_size": RUN["rows"],
            "warmup": 0.0,
            "scheduler": "constant",
            "log_every": 10,
        },
        "engine": {"seed": RUN["seed"], "attention": "sdpa"},
        "output": {"dir": str(WORK / name), "keep_best": False},
    }
    path = WORK / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    summary = commands.train(load_recipe(path), "finetune", overwrite=True)
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "train_tokens": summary["train_tokens"],
        "model": str(WORK / name / "model"),
    }


def _common_args(name: str, batch: int) -> dict:
    return {
        "output_dir": str(WORK / name),
        "per_device_train_batch_size": batch,
        "max_steps": RUN["steps"],
        "learning_rate": RUN["lr"],
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "seed": RUN["seed"],
        "bf16": True,
        "use_cpu": True,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": [],
        "include_num_input_tokens_seen": "non_padding",
    }


def trl_run(name: str) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(CHAT / "train.jsonl"), split="train")
    config = SFTConfig(
        **_common_args(name, RUN["rows"]),
        max_length=RUN["max_length"],
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        assistant_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    return _train_and_save(trainer, tokenizer, name)


def trainer_run(name: str) -> dict:
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(CHAT / "train.jsonl"), split="train")

    def encode(rows: dict) -> dict:
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows["messages"]]
        return tokenizer(texts, truncation=True, max_length=RUN["max_length"], add_special_tokens=False)

    data = data.map(encode, batched=True, remove_columns=data.column_names)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**_common_args(name, RUN["trainer_batch"])),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    return _train_and_save(trainer, tokenizer, name)


def _train_and_save(trainer, tokenizer, name: str) -> dict:
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.num_input_tokens_seen
    trainer.save_model(str(WORK / name / "model"))
    tokenizer.save_pretrained(str(WORK / name / "model"))
    return {
        "tokens_per_s": tokens / seconds,
        "train_seconds": seconds,
        "train_tokens": tokens,
        "model": str(WORK / name / "model"),
    }


def held_out_loss(model_dir: str) -> float:
    """Mean cross-entropy on the assistant tokens (replies + end-of-turn) of the held-out conversations."""
    from sft_cli.config.recipe import load_recipe
    from sft_cli.engine.accelerator import make_accelerator
    from sft_cli.engine.evaluation import evaluate_over_processes
    from sft_cli.tasks.registry import build_task

    path = WORK / "held-out.yaml"
    path.write_text(
        json.dumps(
            {
                "task": "generation",
                "data": {
                    "train": str(CHAT / "train.jsonl"),
                    "eval": str(CHAT / "test.jsonl"),
                    "chat_template": "chatml",
                    "max_length": RUN["max_length"],
                },
                "engine": {"precision": "fp32"},
                "output": {"dir": str(WORK / "held-out")},
            }
        )
    )
    recipe = load_recipe(path)
    accelerator = make_accelerator(recipe.engine)
    task = build_task(recipe)
    task.setup(model_dir=model_dir, train=False)
    return evaluate_over_processes(task, task.model, accelerator, 16, final=False)["loss"]


RUNS = {"dec/trainer-clm-collator": trainer_run, "dec/trl-sfttrainer": trl_run, "dec/sft": sft_run}
