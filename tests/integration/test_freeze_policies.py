"""Freeze policies through the real CLI on the packaged MiniLM: frozen weights bit-identical, trainable changed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sft_cli.model.backbone import embedded_aliases
from tests.conftest import TOPICS, read_jsonl, write_jsonl

pytestmark = pytest.mark.integration
BASE = {f"bert.{k}": v for k, v in load_file(str(embedded_aliases()["minilm-l6"] / "model.safetensors")).items()}


def finetune(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    train = write_jsonl(tmp / "train.jsonl", read_jsonl(TOPICS / "train.jsonl")[:64])
    recipe = tmp / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "task": "classification",
                "data": {"train": str(train), "max_length": 32},
                "optim": {"lr": 1e-3},
                "schedule": {"max_steps": 4, "batch_size": 16, "warmup": 0},
                "output": {"dir": str(tmp / "run")},
            }
        )
    )
    cmd = [sys.executable, "-m", "sft_cli", "finetune", str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def trained_weights(tmp: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tmp / "run" / "model" / "model.safetensors"))


@pytest.mark.parametrize(
    "overrides, trainable",
    [
        (["freeze.policy=head-only"], lambda n: n.startswith("classifier")),
        (
            ["freeze.policy=last-n", "freeze.last_n=2"],
            lambda n: n.startswith("classifier") or ".layer.4." in n or ".layer.5." in n,
        ),
        (
            ["freeze.policy=patterns", "freeze.trainable=[classifier,attention]", "freeze.frozen=[LayerNorm]"],
            lambda n: n.startswith("classifier") or ("attention" in n and "LayerNorm" not in n),
        ),
        (
            ["freeze.policy=last-n", "freeze.last_n=1", "freeze.embeddings=false"],
            lambda n: n.startswith("classifier") or ".layer.5." in n or "embeddings" in n,
        ),
    ],
    ids=["head-only", "last-n", "patterns", "last-n+embeddings"],
)
def test_frozen_bit_identical_trainable_changed(tmp_path, overrides, trainable):
    done = finetune(tmp_path, *overrides)
    assert done.returncode == 0, done.stderr[-2000:]
    weights = trained_weights(tmp_path)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    expected = sum(w.numel() for n, w in weights.items() if trainable(n))
    assert summary["trainable_params"] == expected
    for name, base in BASE.items():
        if name not in weights:
            continue
        if trainable(name):
            assert not torch.equal(weights[name], base), f"{name} should have trained"
        else:
            assert torch.equal(weights[name], base), f"{name} should be frozen"


def test_pattern_matching_nothing_is_a_clear_error(tmp_path):
    done = finetune(tmp_path, "freeze.policy=patterns", "freeze.trainable=[nonexistent_layer]")
    assert done.returncode == 2
    assert "freeze.trainable" in done.stderr and "bert." in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("merge", [True, False])
def test_lora_trains_adapters_and_reloads(tmp_path, merge):
    from transformers import AutoModelForSequenceClassification

    from sft_cli.model.backbone import load_trained

    done = finetune(tmp_path, "freeze.policy=lora", "freeze.lora.r=4", f"output.merge_lora={str(merge).lower()}")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["trainable_pct"] < 1.0
    model_dir = tmp_path / "run" / "model"
    if merge:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # plain transformers load
        merged = model.state_dict()
        changed = [n for n in BASE if "attention.self.query.weight" in n and not torch.equal(merged[n], BASE[n])]
        assert len(changed) == 6  # every layer's query got its low-rank update folded in
        unchanged = [n for n in BASE if "intermediate" in n]
        assert all(torch.equal(merged[n], BASE[n]) for n in unchanged)
    else:
        assert (model_dir / "adapter_config.json").exists() and not (model_dir / "model.safetensors").exists()
        model = load_trained(AutoModelForSequenceClassification, str(model_dir))
        assert model.config.num_labels == len({r["label"] for r in read_jsonl(tmp_path / "train.jsonl")})


def test_export_merges_a_lora_adapter_and_refuses_a_missing_base(tmp_path):
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_cli.model.backbone import load_trained

    done = finetune(tmp_path, "freeze.policy=lora", "freeze.lora.r=4")
    assert done.returncode == 0, done.stderr[-2000:]
    run, export = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "sft_cli", "export", str(run), "--to", str(export), "--merge-lora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (export / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    inputs = tokenizer(["read a file line by line"], return_tensors="pt")
    with torch.no_grad():
        adapter = load_trained(AutoModelForSequenceClassification, str(run / "model")).eval()(**inputs).logits
        merged = AutoModelForSequenceClassification.from_pretrained(export).eval()(**inputs).logits
    assert torch.allclose(adapter, merged, atol=1e-5)
    # the adapter's base gone: a clear one-line refusal, nothing written
    adapter_config = run / "model" / "adapter_config.json"
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = str(tmp_path / "moved-away")
    adapter_config.write_text(json.dumps(settings))
    cmd = [sys.executable, "-m", "sft_cli", "export", str(run), "--to", str(tmp_path / "again"), "--merge-lora"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "base model" in done.stderr and done.stderr.count("\n") == 1
    assert not (tmp_path / "again").exists()
    shutil.rmtree(export)
