"""Speech recognition through the real CLI on a tiny from-scratch wav2vec2 and the shipped espeak-ng clips:
finetune, eval (WER / CER), predict on an audio folder, export; the export's ASR pipeline transcribes what
`sft predict` does; an interrupted run resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.conftest import invoke_cli, read_jsonl
from tests.unit.test_speech import SPEECH, speech_values

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speech")
    values = speech_values(
        tmp, schedule={"epochs": 4, "batch_size": 8, "log_every": 1}, optim={"lr": 3e-3}, output={"save_every": 4}
    )
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    invoke_cli("finetune", str(recipe), "--overwrite")
    invoke_cli("eval", str(recipe))
    return tmp, recipe


def test_eval_reports_wer_cer_and_each_transcript(trained):
    tmp, _ = trained
    metrics = json.loads((tmp / "run" / "eval.json").read_text())
    assert {"wer", "cer", "loss", "num_examples", "skipped_rows"} <= set(metrics)
    assert metrics["num_examples"] == 12 and metrics["skipped_rows"] == 0 and metrics["cer"] >= 0
    # twenty steps do not leave CTC's all-blank stage (that takes hundreds: `make demo-speech`), but the held-out
    # loss must fall well below where training started
    first = next(r["loss"] for r in read_jsonl(tmp / "run" / "metrics.jsonl") if "loss" in r)
    assert metrics["loss"] < 0.6 * first, (metrics["loss"], first)
    shown = read_jsonl(tmp / "run" / "predictions.jsonl")
    references = [json.loads(line)["text"] for line in (SPEECH / "test.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in shown] == references and all("prediction" in p for p in shown)
    card = (tmp / "run" / "model" / "README.md").read_text()
    assert "pipeline_tag: automatic-speech-recognition" in card


def test_the_exports_pipeline_transcribes_what_sft_predict_does(trained):
    from transformers import pipeline

    from sft_cli.data.audio import read_audio

    tmp, recipe = trained
    output = tmp / "predicted.jsonl"
    invoke_cli("predict", str(recipe), "--input", str(SPEECH / "test"), "--output", str(output), "--overwrite")
    rows = read_jsonl(output)
    assert len(rows) == 12 and all(r["duration"] > 0.5 for r in rows)
    invoke_cli("export", str(tmp / "run"), "--to", str(tmp / "export"), "--overwrite")
    pipe = pipeline("automatic-speech-recognition", model=str(tmp / "export"))
    for row in rows[:6]:
        audio = read_audio(row["audio"], 16000)  # the pipeline resamples only with torchaudio: give it 16 kHz
        assert " ".join(pipe({"raw": audio, "sampling_rate": 16000})["text"].split()) == row["prediction"]


def test_an_interrupted_run_resumes_exactly(trained, caplog):
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    tmp, recipe = trained
    run = tmp / "resumed"
    shutil.copytree(tmp / "run", run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000020", ignore_errors=True)
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert saved and saved[-1] == "step-00000016"
    summary = commands.train(load_recipe(recipe, [f"output.dir={run}"]), "finetune", resume="")
    whole = json.loads((tmp / "run" / "summary.json").read_text())
    assert "step-00000016 at step 16" in caplog.text
    assert summary["steps"] == whole["steps"] == 20
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if "loss" in r] for d in (tmp / "run", run)]
    assert losses[1][-2:] == pytest.approx(losses[0][-2:], abs=1e-6)
    assert summary["eval"]["eval_loss"] == pytest.approx(whole["eval"]["eval_loss"], abs=1e-6)


def test_a_whisper_export_transcribes_what_sft_predict_does(tmp_path):
    """The tiny Whisper, two steps: the exported generation config starts the decoder as training did."""
    from transformers import pipeline

    from sft_cli.data.audio import read_audio
    from tests.unit.test_speech import build_tiny_whisper

    whisper = build_tiny_whisper(tmp_path / "whisper")
    backbone = {"name": str(whisper), "from_scratch": False, "arch": None, "config": {}}
    values = speech_values(
        tmp_path, backbone=backbone, data={"language": "en"}, schedule={"max_steps": 2}, predict={"max_new_tokens": 12}
    )
    recipe = tmp_path / "whisper.yaml"
    recipe.write_text(yaml.safe_dump(values))
    invoke_cli("finetune", str(recipe), "--overwrite")
    output = tmp_path / "predicted.jsonl"
    clips = sorted((SPEECH / "test").glob("*.flac"))[:3]
    for clip in clips:
        shutil.copy(clip, tmp_path / clip.name)
    invoke_cli("predict", str(recipe), "--input", str(tmp_path / "*.flac"), "--output", str(output), "--overwrite")
    rows = read_jsonl(output)
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"{clip.name}\n" for clip in reversed(clips)))
    invoke_cli(
        "predict", str(recipe), "--input", str(listed), "--output", str(tmp_path / "listed.jsonl"), "--overwrite"
    )
    assert [r["prediction"] for r in read_jsonl(tmp_path / "listed.jsonl")] == [r["prediction"] for r in rows][::-1]
    invoke_cli("export", str(tmp_path / "run"), "--to", str(tmp_path / "export"), "--overwrite")
    pipe = pipeline("automatic-speech-recognition", model=str(tmp_path / "export"))
    for row in rows:
        heard = pipe({"raw": read_audio(row["audio"], 16000), "sampling_rate": 16000})["text"]
        assert " ".join(heard.split()) == row["prediction"]
