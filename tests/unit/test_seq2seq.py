"""Encoder-decoder generation on tiny random-init T5 and BART: the loss is on target tokens only and equals the
model's own, search settings reach `generate`, freeze policies and LoRA pick the right parameters."""

from __future__ import annotations

import pytest
import torch

from sft_cli.config.recipe import load_recipe
from sft_cli.model import backbone as bb
from sft_cli.tasks.registry import build_task
from sft_cli.tasks.seq2seq import Seq2SeqTask
from tests.conftest import DOCS, write_jsonl, write_recipe

ARCHS = ("t5", "bart")


def pairs(n: int, offset: int = 0) -> list[dict]:
    """Source: a line of the Python docs; target: its first four words (a real, learnable mapping)."""
    lines = [line for line in (DOCS / "eval.txt").read_text(encoding="utf-8").splitlines() if len(line.split()) > 6]
    return [{"prompt": line, "response": " ".join(line.split()[:4])} for line in lines[offset : offset + n]]


def seq2seq_values(tmp_path, model_dir, **sections) -> dict:
    train = write_jsonl(tmp_path / "train.jsonl", pairs(48))
    test = write_jsonl(tmp_path / "test.jsonl", pairs(12, 48))
    values = {
        "name": "s2s",
        "task": "generation",
        "backbone": {"name": str(model_dir)},
        "data": {"train": str(train), "eval": str(test), "max_length": 48, "max_target_length": 12},
        "optim": {"lr": 1e-3},
        "schedule": {"epochs": 1, "batch_size": 8, "warmup": 0.0, "log_every": 2},
        "engine": {"device": "cpu", "precision": "fp32", "seed": 0},
        "eval": {"max_new_tokens": 8, "batch_size": 16},
        "output": {"dir": str(tmp_path / "run")},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value}
    return values


def seq2seq_task(tmp_path, model_dir, **sections) -> Seq2SeqTask:
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", seq2seq_values(tmp_path, model_dir, **sections)))
    task = build_task(recipe)
    task.setup()
    return task


@pytest.mark.parametrize("arch", ARCHS)
def test_only_target_tokens_carry_the_loss_and_it_equals_the_models_own(tmp_path, tiny_seq2seq, arch):
    task = seq2seq_task(tmp_path, tiny_seq2seq[arch])
    assert isinstance(task, Seq2SeqTask) and task.chunked  # no full logits, checked against them at setup
    rows = [task.train_set[i] for i in range(6)]
    batch = task.collate(rows, train=True)
    tokenizer, eos = task.tokenizer, task.tokenizer.eos_token_id
    for pair, labels in zip(pairs(6), batch["labels"]):
        target = tokenizer(text_target=pair["response"])["input_ids"]
        # the target (cut to data.max_target_length, 12), then EOS
        assert labels[labels != -100].tolist() == [t for t in target if t != eos][:11] + [eos]
    network = bb.unwrap(task.model)
    with torch.no_grad():
        ours = task.loss_terms(task.model, batch)["sup"]
        reference = network(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert int(ours[1]) == int((batch["labels"] != -100).sum())
    assert torch.allclose(ours[0] / ours[1], reference, rtol=1e-5), (ours, reference)
    # the source is the encoder's alone: no source token is ever a label
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, 0] = (changed["input_ids"][:, 0] + 7) % len(tokenizer)
    with torch.no_grad():
        assert task.counts(changed)["sup"] == task.counts(batch)["sup"]
        assert not torch.equal(task.loss_terms(task.model, changed)["sup"][0], ours[0])


def test_search_settings_reach_generate_and_take_effect(tmp_path, tiny_seq2seq, monkeypatch):
    search = {"num_beams": 3, "length_penalty": 0.6, "no_repeat_ngram_size": 1}
    task = seq2seq_task(tmp_path, tiny_seq2seq["t5"], eval={"max_new_tokens": 10, **search})
    network = bb.unwrap(task.model)
    seen: list[dict] = []
    original = network.generate

    outputs: list[torch.Tensor] = []

    def spy(**kwargs):
        seen.append(kwargs)
        outputs.append(original(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(network, "generate", spy)
    with torch.no_grad():
        task.generate_all(network, lambda items: items)
    assert seen and all({k: call[k] for k in search} == search for call in seen)
    specials = {task.tokenizer.pad_token_id, task.tokenizer.eos_token_id}
    for output in outputs:  # no_repeat_ngram_size 1: no token twice in one output
        for row in output.tolist():
            ids = [t for t in row if t not in specials]
            assert ids and len(ids) == len(set(ids)), row


def test_predict_settings_are_saved_for_the_export(tmp_path, tiny_seq2seq):
    task = seq2seq_task(tmp_path, tiny_seq2seq["bart"], predict={"num_beams": 4, "length_penalty": 1.5})
    task.save(bb.unwrap(task.model), tmp_path)
    import json

    saved = json.loads((tmp_path / "generation_config.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_beams"] == 4 and saved["length_penalty"] == 1.5
    assert set(config["custom_pipelines"]) == {"translation", "summarization", "text2text-generation"}
    assert (tmp_path / "sft_seq2seq_pipeline.py").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trains_only_adapters_in_encoder_and_decoder(tmp_path, tiny_seq2seq, arch):
    task = seq2seq_task(tmp_path, tiny_seq2seq[arch], freeze={"policy": "lora"})
    trainable = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    assert any("encoder" in n for n in trainable) and any("decoder" in n for n in trainable)
    batch = task.collate([task.train_set[i] for i in range(4)], train=True)
    task.loss_terms(task.model, batch)["sup"][0].backward()
    grads = [n for n, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads and all("lora_" in n for n in grads)


def test_freezing_the_encoder_keeps_the_shared_embeddings_to_their_own_key(tmp_path, tiny_seq2seq):
    task = seq2seq_task(tmp_path, tiny_seq2seq["t5"], freeze={"encoder": True})
    frozen = {n for n, p in task.model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("lm.encoder.") for n in frozen), frozen
    assert "lm.shared.weight" not in frozen  # tied with the decoder: `freeze.embeddings` decides it
    both = seq2seq_task(tmp_path, tiny_seq2seq["t5"], freeze={"encoder": True, "embeddings": True})
    assert "lm.shared.weight" in {n for n, p in both.model.named_parameters() if not p.requires_grad}


# ---- pretraining objectives: span corruption (T5) and text infilling (BART) ----------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_span_corruption_writes_t5s_sentinel_format(seed):
    import numpy as np

    from sft_cli.data.denoising import span_corruption

    ids = list(range(1000, 1000 + 40 + seed * 7))
    sentinels = [-(i + 1) for i in range(100)]
    source, target = span_corruption(ids, sentinels, np.random.default_rng(seed))
    used = [t for t in source if t < 0]
    assert used == sentinels[: len(used)] and [t for t in target if t < 0] == used  # in order, once each side
    assert target[0] == sentinels[0]  # the target starts with the first sentinel
    hidden = len(target) - len(used)
    assert abs(hidden - round(len(ids) * 0.15)) <= 1  # 15% noise
    # putting each hidden span back where its sentinel stands gives the block again
    spans, current = {}, None
    for token in target:
        if token < 0:
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    assert [t for token in source for t in (spans[token] if token < 0 else [token])] == ids


@pytest.mark.parametrize("seed", range(20))
def test_text_infilling_masks_about_30_percent_in_spans(seed):
    import numpy as np

    from sft_cli.data.denoising import text_infilling

    ids = list(range(1000, 1100))
    source = text_infilling(ids, -1, np.random.default_rng(seed))
    kept = [t for t in source if t != -1]
    assert len(kept) == 70 and kept == sorted(kept) and set(kept) <= set(ids)  # 30 masked, order kept
    assert 1 <= source.count(-1) <= 30  # spans collapse to one mask each


def test_the_objective_picks_span_for_t5_and_denoise_for_bart(tiny_seq2seq):
    from transformers import AutoConfig

    from sft_cli.errors import SftError
    from sft_cli.tasks.lm_aux import pick_objective

    assert pick_objective("auto", AutoConfig.from_pretrained(tiny_seq2seq["t5"])) == "span"
    assert pick_objective("auto", AutoConfig.from_pretrained(tiny_seq2seq["bart"])) == "denoise"
    with pytest.raises(SftError, match="objective: clm is for encoders and decoders"):
        pick_objective("clm", AutoConfig.from_pretrained(tiny_seq2seq["t5"]))
    with pytest.raises(SftError, match="pretrains encoder-decoder models"):
        pick_objective("span", AutoConfig.for_model("gpt2"))


def test_translation_keys_follow_run_translation_and_nllb_codes():
    from sft_cli.tasks.seq2seq import language_key

    assert language_key(["en", "es"], "en") == "en"
    assert language_key(["en", "ro"], "en_XX") == "en"  # mBART codes read the rows' short keys
    assert language_key(["en", "de"], "deu_Latn") == "de"  # NLLB codes too
    assert language_key(["en", "de"], "fr") is None


def test_translation_rows_missing_a_language_are_skipped_and_counted(tmp_path, tiny_seq2seq):
    rows = [{"translation": {"en": p["prompt"], "es": p["response"]}} for p in pairs(20)]
    rows[3] = {"translation": {"en": "Only English here."}}  # the struct column gives it es: null
    rows[5] = {"translation": None}
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    values = seq2seq_values(tmp_path, tiny_seq2seq["t5"])
    values["data"] = {"train": str(train), "format": "translation", "source_lang": "en", "target_lang": "es"}
    task = build_task(load_recipe(write_recipe(tmp_path / "tr.yaml", values)))
    task.setup()
    assert len(task.train_set) == 18 and task.skipped.count("data.train") == 2
