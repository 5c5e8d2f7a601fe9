"""Speech recognition pieces: the CTC vocabulary and greedy decoding, Whisper's decoder prefix and loss mask,
duration grouping, audio loading and the one-line errors for bad audio and transcripts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sft_cli.errors import SftError
from tests.conftest import REPO, write_jsonl

SPEECH = REPO / "tests" / "fixtures" / "speech"
# a 2-layer, 64-wide wav2vec2 with a small CNN: builds and runs a batch in well under a second
TINY_WAV2VEC2 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "conv_dim": [32, 32, 32, 32, 32, 32, 32],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 4,
    "mask_time_prob": 0.0,  # no SpecAugment: a model this small learns within the tests' few steps only without it
}


def speech_values(tmp: Path, **sections: Any) -> dict[str, Any]:
    """A speech-recognition recipe for a tiny from-scratch wav2vec2 on the shipped espeak-ng clips."""
    values: dict[str, Any] = {
        "task": "speech-recognition",
        "backbone": {"arch": "wav2vec2", "name": "", "from_scratch": True, "config": dict(TINY_WAV2VEC2)},
        "data": {"train": str(SPEECH / "train.jsonl"), "eval": str(SPEECH / "test.jsonl")},
        "schedule": {"epochs": 1, "batch_size": 8},
        "optim": {"lr": 1e-3},
        "engine": {"precision": "fp32"},
        "output": {"dir": str(tmp / "run")},
    }
    for section, value in sections.items():
        values[section] = {**values.get(section, {}), **value} if isinstance(value, dict) else value
    return values


def speech_task(tmp: Path, train: bool = True, **sections: Any):
    from sft_cli.config.recipe import load_recipe
    from sft_cli.tasks.registry import build_task
    from tests.conftest import write_recipe

    task = build_task(load_recipe(write_recipe(tmp / "recipe.yaml", speech_values(tmp, **sections))))
    task.setup(train=train)
    return task


def build_tiny_whisper(directory: Path, vocab_size: int = 400) -> Path:
    """A random-init 2-layer Whisper with a byte-level BPE tokenizer trained on the fixture transcripts (and all of
    Whisper's special tokens, in Whisper's order) and a 16-mel, 4-second feature extractor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    texts = [json.loads(line)["text"] for line in (SPEECH / "train.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(
        texts * 5, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = WhisperTokenizer(vocab=state["vocab"], merges=merges)
    languages = [f"<|{code}|>" for code in LANGUAGES]
    tail = ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>"]
    tokenizer.add_tokens(["<|endoftext|>", "<|startoftranscript|>", *languages, *tail], special_tokens=True)
    tokenizer.pad_token = "<|endoftext|>"
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=16,
        encoder_layers=2,
        decoder_layers=2,
        d_model=64,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=200,  # 4 s of 10 ms frames, halved by the encoder's stride-2 convolution
        max_target_positions=64,
        decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=16, chunk_length=4).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "model")


def test_the_ctc_vocabulary_has_a_blank_and_a_word_delimiter():
    from sft_cli.tasks.speech_recognition import BLANK, DELIMITER, UNKNOWN, build_vocabulary

    vocabulary = build_vocabulary(["put the cup", "on the desk"])
    assert set(vocabulary) == {DELIMITER, UNKNOWN, BLANK, *"puthecondsk"}
    assert sorted(vocabulary.values()) == list(range(len(vocabulary)))


def test_greedy_ctc_decoding_merges_repeats_and_drops_blanks():
    from sft_cli.tasks.speech_recognition import ctc_collapse

    blank = 9
    assert ctc_collapse([9, 1, 1, 9, 1, 2, 2, 2, 9, 9, 3, 9], blank) == [1, 1, 2, 3]  # a blank separates a double
    assert ctc_collapse([9, 9, 9], blank) == []
    assert ctc_collapse([4, 4, 4], blank) == [4]


def test_the_built_tokenizer_writes_spaces_as_the_delimiter_and_pads_with_the_blank(tmp_path):
    task = speech_task(tmp_path)
    tokenizer = task.tokenizer
    assert tokenizer.pad_token == "[PAD]" and task.model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("put the cup")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == list("put|the|cup")
    assert task.model.config.vocab_size == len(tokenizer) and task.model.config.ctc_zero_infinity
    # greedy decoding of a best path that spells the ids with repeats and blanks gives the text back
    blank = tokenizer.pad_token_id
    path = [blank, *[i for i in ids for _ in range(2)], blank]
    from sft_cli.tasks.speech_recognition import ctc_collapse

    assert tokenizer.decode(ctc_collapse(path, blank), group_tokens=False) == "put the cup"


def test_clips_are_resampled_to_the_feature_extractors_rate_and_grouped_by_duration(tmp_path):
    import soundfile as sf

    task = speech_task(tmp_path)
    first = task.train_set[0]
    native = sf.info(str(SPEECH / "train" / "0001.flac"))
    assert native.samplerate == 22050 and task.rate == 16000
    assert abs(len(first["audio"]) - native.frames * 16000 / 22050) <= 2
    assert task.groups_by_length(None) is True
    assert task.lengths("train") == [len(e["audio"]) for e in task.train_set]
    batch = task.collate(task.train_set[:3], train=True)
    assert batch["input_values"].shape[0] == 3 and batch["attention_mask"].sum(-1).tolist() == task.lengths("train")[:3]
    assert (batch["labels"] == -100).any() or len({len(e["input_ids"]) for e in task.train_set[:3]}) == 1


def test_a_tiny_whisper_starts_with_its_language_and_task_tokens_and_learns_only_the_transcript(tmp_path, tiny_whisper):
    task = speech_task(
        tmp_path,
        backbone={"name": str(tiny_whisper), "from_scratch": False, "arch": None, "config": {}},
        data={"language": "english"},
    )
    tokenizer = task.tokenizer
    prefix = tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"])
    assert tokenizer.prefix_tokens == prefix
    rows = task.train_set[:2]
    batch = task.collate(rows, train=True)
    for row, inputs, labels in zip(rows, batch["decoder_input_ids"].tolist(), batch["labels"].tolist()):
        transcript = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        assert inputs[:4] == prefix
        assert labels[:3] == [-100] * 3  # after <|startoftranscript|>, <|en|> and <|transcribe|>: given, not learnt
        learnt = [t for t in labels if t != -100]
        assert learnt == transcript + [tokenizer.eos_token_id]
    assert int(task.counts(batch)["sup"]) == sum(
        len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) + 1 for r in rows
    )
    summed, count = task.loss_terms(task.model, batch)["sup"]
    assert summed.item() > 0 and int(count) == int(task.counts(batch)["sup"])
    generation = task.model.generation_config
    assert (
        generation.language == "en" and generation.task == "transcribe" and generation.lang_to_id["<|en|>"] == prefix[1]
    )
    with pytest.raises(SftError, match="data.language: 'klingon'"):
        speech_task(
            tmp_path,
            backbone={"name": str(tiny_whisper), "from_scratch": False, "arch": None, "config": {}},
            data={"language": "klingon"},
        )


def test_clips_longer_than_max_duration_or_whispers_window_are_skipped_and_counted(tmp_path, tiny_whisper):
    durations = [len(e["audio"]) / 16000 for e in speech_task(tmp_path).train_set]
    limit = sorted(durations)[len(durations) // 2]
    task = speech_task(tmp_path, data={"max_duration": limit})
    longer = sum(d > limit for d in durations)
    assert longer > 0 and len(task.train_set) == len(durations) - longer
    assert "longer than" in task.skipped.describe("data.train") and task.skipped.count("data.train") == longer
    whisper = speech_task(
        tmp_path, backbone={"name": str(tiny_whisper), "from_scratch": False, "arch": None, "config": {}}
    )
    assert whisper.max_seconds() == 4.0  # the tiny feature extractor's window, below data.max_duration's 30 s


def test_an_audiofolder_with_metadata_csv_loads(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [json.loads(line) for line in (SPEECH / "test.jsonl").read_text().splitlines()][:6]
    lines = ["file_name,sentence"]
    for row in rows:
        shutil.copy(SPEECH / row["audio"], folder / Path(row["audio"]).name)
        lines.append(f"{Path(row['audio']).name},{row['text']}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    task = speech_task(tmp_path, data={"train": str(folder), "eval": str(folder), "text_field": "sentence"})
    assert [e["text"] for e in task.eval_set] == [r["text"] for r in rows]
    assert [e["source"] for e in task.train_set] == [str(folder / Path(r["audio"]).name) for r in rows]


def bad_rows(tmp: Path, problem: str) -> Path:
    rows = [json.loads(line) for line in (SPEECH / "train.jsonl").read_text().splitlines()]
    rows = [{**r, "audio": str(SPEECH / r["audio"])} for r in rows]
    if problem == "missing":
        rows[3]["audio"] = str(tmp / "gone.wav")
    elif problem == "corrupt":
        (tmp / "bad.flac").write_bytes(b"not audio at all")
        rows[3]["audio"] = str(tmp / "bad.flac")
    elif problem == "empty":
        rows[3]["text"] = "  "
    return write_jsonl(tmp / f"{problem}.jsonl", rows)


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing", "row 4: .*gone.wav is not a readable audio file"),
        ("corrupt", "row 4: .*bad.flac is not a readable audio file"),
        ("empty", "row 4: empty transcript"),
    ],
)
def test_bad_audio_and_transcripts_are_one_line_errors_or_skipped_and_counted(tmp_path, problem, message):
    data = {"train": str(bad_rows(tmp_path, problem))}
    with pytest.raises(SftError, match=f"data.train: {message}.*data.skip_invalid") as err:
        speech_task(tmp_path, data=data)
    assert "\n" not in str(err.value)
    task = speech_task(tmp_path, data={**data, "skip_invalid": True})
    assert task.skipped.count("data.train") == 1 and len(task.train_set) == 39


def test_a_fixed_vocabulary_refuses_characters_it_cannot_write(tmp_path):
    trained = speech_task(tmp_path)
    model_dir = tmp_path / "model"
    trained.save(trained.model, model_dir)
    rows = [json.loads(line) for line in (SPEECH / "train.jsonl").read_text().splitlines()]
    rows = [{**r, "audio": str(SPEECH / r["audio"])} for r in rows]
    rows[5]["text"] = "Put the cup on the table!"
    data = {"train": str(write_jsonl(tmp_path / "caps.jsonl", rows))}
    backbone = {"name": str(model_dir), "from_scratch": False, "arch": None, "config": {}}
    with pytest.raises(SftError, match=r"row 6: transcript .* character\(s\) '!', 'P' outside the model's vocabulary"):
        speech_task(tmp_path, backbone=backbone, data=data)
    fixed = speech_task(tmp_path, backbone=backbone, data={**data, "lowercase": True, "chars_to_ignore": ["!"]})
    assert fixed.train_set[5]["text"] == "put the cup on the table" and not fixed.built_vocabulary


def test_a_saved_dataset_with_an_audio_column_loads(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (SPEECH / "test.jsonl").read_text().splitlines()][:4]
    table = datasets.Dataset.from_dict(
        {"audio": [str(SPEECH / r["audio"]) for r in rows], "text": [r["text"] for r in rows]}
    ).cast_column("audio", datasets.Audio(decode=False))
    table.save_to_disk(str(tmp_path / "saved"))
    task = speech_task(tmp_path, data={"eval": str(tmp_path / "saved")})
    assert [e["text"] for e in task.eval_set] == [r["text"] for r in rows]
    assert all(len(e["audio"]) > 16000 for e in task.eval_set)


def test_lora_adapts_the_attention_and_trains_the_new_ctc_head(tmp_path):
    task = speech_task(tmp_path, freeze={"policy": "lora"})
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("lm_head" in n for n in trainable)
    assert not any("feature_extractor" in n for n in trainable)
