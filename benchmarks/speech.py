"""The speech-recognition row of `make bench`: sft against the Hugging Face Trainer fine-tuning a CTC model.

Both sides train the same wav2vec2-style CTC model (random init, saved once to benchmarks/.work/asr-base with the
character vocabulary of the training transcripts and a 16 kHz feature extractor) on the same espeak-ng clips
(scripts/make_speech.py: 1,200 train / 200 test utterances, test voices never heard in training), with the same
epochs, batch size, learning rate, warmup, weight decay, seed and fp32, batches grouped by duration on both
sides. The Trainer side is written the way run_speech_recognition_ctc.py writes it (input_values + labels per
row, a padding CTC collator with -100 label padding, `group_by_length` on the input length, ctc_loss_reduction
"mean", ctc_zero_infinity). Each side transcribes the test split greedily with its own model; both are scored by
the same jiwer WER / CER. Audio seconds/s counts the training clips' seconds of every epoch on both sides.

SFT_BENCH_SMOKE=1 (a check of the wiring, not a benchmark): 48 train / 16 test clips and 2 optimizer steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import encoder_tasks  # benchmarks/ is on the path, as run.py puts it

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / ".work"
SMOKE = os.environ.get("SFT_BENCH_SMOKE") == "1"
DATA = WORK / ("smoke/speech-data" if SMOKE else "speech-data")
BASE = WORK / ("smoke/asr-base" if SMOKE else "asr-base")
RUN = {"epochs": 6, "batch_size": 16, "lr": 1e-3, "seed": 42, "warmup": 0.1, "weight_decay": 0.01}
WAV2VEC2 = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 768,
    "conv_dim": [64] * 7,
    "num_conv_pos_embeddings": 32,
    "num_conv_pos_embedding_groups": 8,
    "feat_extract_norm": "layer",
    "do_stable_layer_norm": True,
}
SMOKE_STEPS = 2
PREFIXES = ("asr/",)
# one seed a side swings CER by ~0.1 at this budget (the held-out loss is past its minimum by the last epoch), and
# the machine's speed drifts between runs: each side runs these seeds, alternating, and the report compares means
SEEDS = (42, 2)


def seed_of(name: str) -> int:
    """The seed a run name carries: `asr/sft` the first of SEEDS, `asr/sft-seed2` seed 2."""
    return encoder_tasks.seed_of(name, SEEDS[0])


def make_data() -> Path:
    """The espeak-ng clips (needs the espeak-ng Debian package), written once."""
    if not (DATA / "test.jsonl").exists():
        sizes = ["--train", "48", "--test", "16"] if SMOKE else []
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_speech.py"), str(DATA), *sizes], check=True)
    return DATA


def make_base() -> Path:
    """The shared starting point: a random-init wav2vec2 CTC model, its character tokenizer and feature extractor."""
    make_data()
    if (BASE / "config.json").exists():
        return BASE
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

    from sft_cli.tasks.speech_recognition import BLANK, DELIMITER, UNKNOWN, build_vocabulary

    texts = [json.loads(line)["text"] for line in (DATA / "train.jsonl").read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(build_vocabulary(texts)))
        tokenizer = Wav2Vec2CTCTokenizer(
            str(Path(tmp) / "vocab.json"), unk_token=UNKNOWN, pad_token=BLANK, word_delimiter_token=DELIMITER
        )
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    config = AutoConfig.for_model(
        "wav2vec2",
        **WAV2VEC2,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        ctc_loss_reduction="mean",
        ctc_zero_infinity=True,
    )
    torch.manual_seed(0)
    AutoModelForCTC.from_config(config).save_pretrained(BASE)
    tokenizer.save_pretrained(BASE)
    extractor.save_pretrained(BASE)
    return BASE


def audio_seconds(split: str) -> float:
    import soundfile as sf

    rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
    return sum(sf.info(str(DATA / r["audio"])).duration for r in rows)


def sft_run(name: str) -> dict:
    from run import run_sft  # the entry point's helper, imported when the row runs

    schedule = {"epochs": RUN["epochs"], "batch_size": RUN["batch_size"], "warmup": RUN["warmup"], "log_every": 50}
    if SMOKE:
        schedule["max_steps"] = SMOKE_STEPS
    values = {
        "task": "speech-recognition",
        "backbone": {"name": str(BASE)},
        "data": {"train": str(DATA / "train.jsonl"), "eval": str(DATA / "test.jsonl")},
        "freeze": {"feature_encoder": False},  # a random-init CNN: both sides train it
        "optim": {"lr": RUN["lr"], "weight_decay": RUN["weight_decay"]},
        "schedule": schedule,
        "engine": {"seed": seed_of(name), "precision": "fp32"},  # the Trainer side is fp32 too
        "eval": {"batch_size": 32},
    }
    result = run_sft(name, values, ("wer", "cer"))
    result["audio_seconds_per_s"] = result["tokens_per_s"] / 100  # sft counts 10 ms frames
    return result


def trainer_run(name: str) -> dict:
    """run_speech_recognition_ctc.py's way: input_values + labels rows, a CTC padding collator, the Trainer."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCTC, Trainer, TrainingArguments, Wav2Vec2Processor, set_seed

    from sft_cli.data.audio import read_audio
    from sft_cli.tasks.speech_recognition import speech_metrics

    set_seed(seed_of(name))
    processor = Wav2Vec2Processor.from_pretrained(BASE)
    model = AutoModelForCTC.from_pretrained(BASE)

    def load(split: str) -> Dataset:
        rows = [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]
        features: dict[str, list] = {"input_values": [], "input_length": [], "labels": [], "text": []}
        for row in rows:
            audio = read_audio(str(DATA / row["audio"]), 16000)
            features["input_values"].append(processor(audio, sampling_rate=16000).input_values[0])
            features["input_length"].append(len(audio))
            features["labels"].append(processor(text=row["text"]).input_ids)
            features["text"].append(row["text"])
        return Dataset.from_dict(features)

    train, test = load("train"), load("test")

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = processor.pad(
            input_features=[{"input_values": r["input_values"]} for r in rows], padding=True, return_tensors="pt"
        )
        labels = processor.pad(labels=[{"input_ids": r["labels"]} for r in rows], padding=True, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels.attention_mask.ne(1), -100)
        return batch

    args = TrainingArguments(
        output_dir=str(WORK / name),
        per_device_train_batch_size=RUN["batch_size"],
        per_device_eval_batch_size=32,
        num_train_epochs=RUN["epochs"],
        max_steps=SMOKE_STEPS if SMOKE else -1,
        learning_rate=RUN["lr"],
        weight_decay=RUN["weight_decay"],
        warmup_steps=RUN["warmup"],  # < 1: a ratio of the steps
        seed=seed_of(name),
        train_sampling_strategy="group_by_length",
        length_column_name="input_length",
        logging_steps=50,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train.remove_columns("text"), data_collator=collate)
    runtime = trainer.train().metrics["train_runtime"]
    seconds = audio_seconds("train") * trainer.state.epoch
    logits = trainer.predict(test.remove_columns("text")).predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    predictions = [" ".join(t.split()) for t in processor.batch_decode(np.argmax(logits, axis=-1))]
    scores = speech_metrics(predictions, test["text"])
    with open(WORK / name / "predictions.jsonl", "w", encoding="utf-8") as f:
        for reference, prediction in zip(test["text"], predictions):
            f.write(json.dumps({"reference": reference, "prediction": prediction}) + "\n")
    return {
        "audio_seconds_per_s": seconds / runtime,
        "train_seconds": runtime,
        "audio_seconds": seconds,
        "wer": scores["wer"],
        "cer": scores["cer"],
    }


SIDES = {"asr/trainer-ctc": trainer_run, "asr/sft": sft_run}
RUNS = {**SIDES, **{f"{name}-seed{seed}": run for seed in SEEDS[1:] for name, run in SIDES.items()}}


def report(results: dict) -> list[str]:
    """The RESULTS.md section: sft and the Trainer side by side, sft's speed and memory as ratios."""
    rows = {k: v for k, v in results.items() if k.startswith(PREFIXES)}
    if not rows:
        return []
    lines = [
        "",
        "## Speech recognition: CTC (wav2vec2-style, espeak-ng speech)",
        "",
        f"Both sides: the same random-init wav2vec2 CTC model ({WAV2VEC2['num_hidden_layers']} layers, hidden "
        f"{WAV2VEC2['hidden_size']}, 7-layer 64-channel CNN with layer norm, character vocabulary), the clips of "
        f"scripts/make_speech.py (1,200 train / 200 test, test voices unseen), {RUN['epochs']} epochs, batch "
        f"{RUN['batch_size']} grouped by duration, LR {RUN['lr']}, linear schedule, warmup {RUN['warmup']}, weight "
        f"decay {RUN['weight_decay']}, seeds {', '.join(map(str, SEEDS))} on each side (runs alternate), fp32. The "
        "Trainer side is run_speech_recognition_ctc.py's recipe; each side transcribes the test clips greedily with "
        "its own final model, scored by the same jiwer call. × Trainer: against the Trainer run of the same seed.",
        "",
        "| run | audio s/s | × Trainer | wall s | peak RSS MB | × Trainer | WER | CER |",
        "|---|---|---|---|---|---|---|---|",
    ]
    quality = (("wer", ".3f", False), ("cer", ".3f", True))
    sides = ("asr/trainer", "asr/sft")
    lines += encoder_tasks.seeded_rows(rows, "asr/trainer", sides, seed_of, "audio_seconds_per_s", ",.1f", quality)
    return lines
