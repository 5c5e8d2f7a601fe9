"""Speech recognition: CTC encoders (wav2vec2, HuBERT, WavLM) and Whisper-style encoder-decoders, scored by WER/CER.

Rows hold an audio file (or a datasets `Audio` value) in `data.audio_field` and its transcript in
`data.text_field`; audiofolders (`metadata.csv` / `metadata.jsonl`) work too. Audio is decoded once at setup
(libsndfile), mono, resampled to the feature extractor's rate; clips over `data.max_duration` are counted in
`skipped_rows`, never cut. A CTC model gets a character vocabulary built from the training transcripts (blank =
the pad token, `|` between words) when it is trained from scratch or its backbone ships no tokenizer; a fixed
vocabulary refuses transcripts with characters it cannot write. Whisper keeps its tokenizer; its decoder starts
with the language / task tokens (`data.language`, `data.asr_task`) and the loss is on the transcript only.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq

from sft_cli.data.audio import AudioError, audio_files, audio_source, load_audio_rows, read_audio
from sft_cli.data.packing import pad_sequences
from sft_cli.data.tables import drop_null_rows, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.tasks.base import Batch, LossTerms, Task

BLANK, UNKNOWN, DELIMITER = "[PAD]", "[UNK]", "|"
FRAMES_PER_SECOND = 100  # throughput is counted in 10 ms audio frames ("tokens"): audio seconds = tokens / 100
SPEECH_FILE = "sft_speech.json"


def normalize_transcript(text: str, lowercase: bool, chars_to_ignore: list[str]) -> str:
    """The transcript a model learns: characters to ignore removed, optionally lowercased, spaces collapsed."""
    for chars in chars_to_ignore:
        text = text.replace(chars, "")
    return " ".join((text.lower() if lowercase else text).split())


def build_vocabulary(transcripts: Iterable[str]) -> dict[str, int]:
    """A CTC character vocabulary: every character of the transcripts (space written as `|`), then the unknown
    token and the blank (which is also the pad token, as wav2vec2's CTC head expects)."""
    chars = sorted({c for text in transcripts for c in text} - {" "})
    vocabulary = {c: i for i, c in enumerate([DELIMITER, *chars])}
    vocabulary[UNKNOWN] = len(vocabulary)
    vocabulary[BLANK] = len(vocabulary)
    return vocabulary


def ctc_collapse(ids: Iterable[int], blank: int) -> list[int]:
    """Greedy CTC decoding of a frame-wise best path: merge repeats, then drop blanks."""
    out: list[int] = []
    previous = None
    for token in ids:
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def speech_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus WER and CER (jiwer): edits over reference words / characters."""
    import jiwer

    pairs = [(r, p) for r, p in zip(references, predictions) if r.strip()]
    refs, hyps = [r for r, _ in pairs], [p for _, p in pairs]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


class SpeechRecognitionTask(Task):
    """Audio in, transcript out: a CTC head on a speech encoder, trained with padding-aware CTC loss."""

    main_metric = "eval_wer"
    main_mode = "min"
    # early in training every WER is 1.0 (and CTC's all-blank stage gives CER 1.0 too): then CER, then loss decide
    tie_breakers = ("eval_cer", "eval_loss")
    auto_class = AutoModelForCTC
    is_seq2seq = False
    group_by_length = True  # batches of similar durations: little padding
    truncates = False  # lengths are audio samples; long clips are skipped, never cut
    shardable = False

    @classmethod
    def variant(cls, recipe: Any) -> type[Task]:
        try:
            encoder_decoder = bb.is_encoder_decoder(recipe.backbone)
        except SftError:
            encoder_decoder = False
        return WhisperTask if encoder_decoder else cls

    # -- data ---------------------------------------------------------------------------------------

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        if train:
            texts = self._transcripts(data.train, "data.train")
            resolved = bb.resolve(self.recipe.backbone)
            self._processor(resolved, texts)
            self._build_model(resolved)
            self.train_set = self._examples(data.train, "data.train")
        else:
            self.load_for_inference(model_dir)
        if data.eval:
            self.eval_set = self._examples(data.eval, "data.eval")

    @property
    def rate(self) -> int:
        """The sampling rate the model hears."""
        return int(self.feature_extractor.sampling_rate)

    def _table(self, location: Any, key: str) -> Any:
        data = self.recipe.data
        table = load_audio_rows(location, key, data.audio_field, self.data_cache)
        require_columns(
            table, [data.audio_field, data.text_field], "data.audio_field/text_field", f"{key} ({location})"
        )
        return drop_null_rows(
            table, [data.audio_field, data.text_field], key, self.skipped, [data.text_field], data.skip_invalid
        )

    def _transcripts(self, location: Any, key: str) -> list[str]:
        data = self.recipe.data
        return [
            normalize_transcript(t, data.lowercase, data.chars_to_ignore)
            for t in self._table(location, key)[data.text_field]
        ]

    def _examples(self, location: Any, key: str) -> list[dict[str, Any]]:
        """Decoded, resampled clips with their label ids; bad rows are one-line errors or, with
        `data.skip_invalid`, skipped and counted. Clips over `data.max_duration` are skipped and counted."""
        data = self.recipe.data
        table = self._table(location, key)
        examples, long_clips = [], 0
        for number, row in enumerate(table, 1):
            source = audio_source(row[data.audio_field])
            text = normalize_transcript(row[data.text_field], data.lowercase, data.chars_to_ignore)
            problem = self.transcript_problem(text)
            if problem is None:
                try:
                    audio = read_audio(row[data.audio_field], self.rate)
                except AudioError as err:
                    problem = f"{source} is not a readable audio file ({err})"
            if problem is not None:
                if not data.skip_invalid:
                    raise SftError(
                        f"{key}: row {number}: {problem} — fix the row, or set data.skip_invalid: true to skip such rows"
                    )
                self.skipped.add(key, problem.split(" (")[0] if "audio" in problem else "invalid transcript")
                continue
            if len(audio) > self.max_seconds() * self.rate:
                long_clips += 1
                continue
            examples.append({"audio": audio, "text": text, "source": source, "input_ids": self.label_ids(text)})
        self.skipped.add(key, f"longer than {self.max_seconds():g} s (data.max_duration)", long_clips)
        if not examples:
            raise SftError(f"{key}: no usable clip in {location} ({self.skipped.describe(key) or 'empty'})")
        for index, example in enumerate(examples):
            example["index"] = index
        return examples

    def max_seconds(self) -> float:
        """The longest clip trained on: `data.max_duration`, and never more than a fixed-window feature extractor
        (Whisper's 30 s) sees, which would cut the rest silently."""
        window = getattr(self.feature_extractor, "chunk_length", None)
        limits = [x for x in (self.recipe.data.max_duration, window) if x]
        return float(min(limits)) if limits else float("inf")

    def transcript_problem(self, text: str) -> Optional[str]:
        """Why a normalized transcript cannot be trained on (empty; characters the vocabulary lacks), or None."""
        if not text:
            return "empty transcript"
        vocabulary = self.tokenizer.get_vocab()
        missing = sorted({c for c in text.replace(" ", "") if c not in vocabulary})
        if missing:
            shown = ", ".join(repr(c) for c in missing[:8])
            return (
                f"transcript {text[:40]!r} has character(s) {shown} outside the model's vocabulary — list them in "
                "data.chars_to_ignore, or set data.lowercase: true if they are capitals"
            )
        return None

    def label_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return [len(e["audio"]) for e in table] if table is not None else None

    def render(self, row: dict) -> Optional[str]:
        """`sft plan`: the transcript the labels spell, and the clip it belongs to."""
        text = self.tokenizer.decode(row["input_ids"], **({} if self.is_seq2seq else {"group_tokens": False}))
        return f"{text}  ({len(row['audio']) / self.rate:.2f} s of audio: {row['source']})"

    def plan_statistics(self) -> dict[str, Any]:
        seconds = [len(e["audio"]) / self.rate for e in self.train_set]
        return {
            "audio_hours": round(sum(seconds) / 3600, 3),
            "clip_seconds": {
                "min": round(min(seconds), 2),
                "mean": round(float(np.mean(seconds)), 2),
                "max": round(max(seconds), 2),
            },
            "vocabulary": len(self.tokenizer),
        }

    # -- model --------------------------------------------------------------------------------------

    def _processor(self, resolved: bb.ResolvedBackbone, texts: list[str]) -> None:
        """Feature extractor and character tokenizer: the backbone's own, or built here from the transcripts."""
        from transformers import AutoFeatureExtractor, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

        spec, location = self.recipe.backbone, resolved.location
        self.feature_extractor = None
        if location:
            try:
                self.feature_extractor = AutoFeatureExtractor.from_pretrained(location)
            except (OSError, ValueError):
                self.feature_extractor = None
        if self.feature_extractor is None:
            self.feature_extractor = Wav2Vec2FeatureExtractor(
                feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
            )
        self.tokenizer = None
        if location and not spec.from_scratch:
            try:
                self.tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(location)
            except (OSError, ValueError, TypeError):
                self.tokenizer = None
        self.built_vocabulary = self.tokenizer is None
        if self.tokenizer is None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "vocab.json"
                path.write_text(json.dumps(build_vocabulary(texts)))
                self.tokenizer = Wav2Vec2CTCTokenizer(
                    str(path), unk_token=UNKNOWN, pad_token=BLANK, word_delimiter_token=DELIMITER, do_lower_case=False
                )

    def _build_model(self, resolved: bb.ResolvedBackbone) -> None:
        updates = {
            "vocab_size": len(self.tokenizer),
            "pad_token_id": self.tokenizer.pad_token_id,
            "ctc_zero_infinity": True,  # a clip too short for its transcript must not poison the batch with inf
            "ctc_loss_reduction": "mean",
        }
        attention = bb.attention_implementation(self.recipe.engine.attention, self.recipe.engine.device, causal=False)
        self.model = bb.load_model(AutoModelForCTC, resolved, self.recipe.backbone, attention, **updates)
        self.model = bb.apply_freeze(self.model, self.recipe.freeze)
        self._freeze_feature_encoder(pretrained=not self.recipe.backbone.from_scratch)

    def _freeze_feature_encoder(self, pretrained: bool) -> None:
        """`freeze.feature_encoder`: the CNN over the raw waveform; null freezes it for pretrained weights (the
        standard wav2vec2 fine-tune) and trains it from scratch."""
        wanted = self.recipe.freeze.feature_encoder
        freeze = pretrained if wanted is None else wanted
        params = [
            p
            for n, p in self.model.named_parameters()
            if re.search(r"(^|\.)(feature_extractor|encoder\.conv[12])\.", n)
        ]
        if wanted is not None and not params:
            raise SftError(
                "freeze.feature_encoder: this backbone has no convolutional feature encoder — leave it unset"
            )
        if self.recipe.freeze.policy == "lora":
            return  # LoRA already freezes the whole base model
        for param in params:
            if freeze or wanted is False:  # null from scratch: the freeze policy decides
                param.requires_grad_(not freeze)

    def load_for_inference(self, model_dir: str) -> None:
        from transformers import AutoFeatureExtractor, AutoTokenizer

        self.feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = bb.load_trained(self.auto_class, model_dir)

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)
        data = self.recipe.data
        info = {"lowercase": data.lowercase, "chars_to_ignore": data.chars_to_ignore, "sampling_rate": self.rate}
        (directory / SPEECH_FILE).write_text(json.dumps(info, indent=2) + "\n")

    # -- training -----------------------------------------------------------------------------------

    def audio_inputs(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """The feature extractor's padded model inputs for raw clips."""
        features = self.feature_extractor(clips, sampling_rate=self.rate, padding=True, return_tensors="pt")
        return {k: v for k, v in features.items() if k in ("input_values", "input_features", "attention_mask")}

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = self.audio_inputs([r["audio"] for r in rows])
        batch["labels"] = pad_sequences([r["input_ids"] for r in rows], -100)
        batch["index"] = torch.tensor([r["index"] for r in rows])
        batch["frames"] = torch.tensor([len(r["audio"]) * FRAMES_PER_SECOND // self.rate for r in rows])
        return batch

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sup": torch.tensor(batch["labels"].shape[0])}

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        inputs = {k: v for k, v in batch.items() if k in ("input_values", "attention_mask", "labels")}
        return model(**inputs)

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        # The model's own padding-aware CTC loss, each clip's loss divided by its transcript length, averaged:
        # times the clips, so the engine's division by the window's clips gives the mean over the window.
        size = batch["labels"].shape[0]
        return {"sup": (self.forward(model, batch).loss * size, torch.tensor(size))}

    def tokens(self, batch: Batch) -> int:
        return int(batch["frames"].sum())

    # -- evaluation and prediction -------------------------------------------------------------------

    def transcribe(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: Any = None) -> list[str]:
        """Greedy CTC transcripts of a padded batch (padding frames cut by the encoder's output lengths)."""
        network = bb.unwrap(model)
        logits = network(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        best = logits.argmax(-1)
        if "attention_mask" in inputs:
            lengths = network._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1)).tolist()
        else:
            lengths = [best.shape[1]] * best.shape[0]
        blank = self.tokenizer.pad_token_id
        texts = []
        for row, length in zip(best.tolist(), lengths):
            texts.append(self.tokenizer.decode(ctc_collapse(row[: int(length)], blank), group_tokens=False))
        return [" ".join(t.split()) for t in texts]

    def transcribe_clips(self, model: torch.nn.Module, clips: list[np.ndarray], settings: Any = None) -> list[str]:
        """Transcripts of raw clips, batched; one clip at a time for a feature encoder with group norm (wav2vec2-base
        style), whose statistics padding would change — as the exported model's pipeline hears them."""
        network = bb.unwrap(model)
        device = next(network.parameters()).device
        alone = getattr(network.config, "feat_extract_norm", None) == "group"
        groups = [[clip] for clip in clips] if alone else [clips]
        texts: list[str] = []
        for group in groups:
            inputs = {k: v.to(device) for k, v in self.audio_inputs(group).items()}
            texts += self.transcribe(model, inputs, settings or self.recipe.eval)
        return texts

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        total, count, results = 0.0, 0, []
        for batch in batches:
            summed, n = self.loss_terms(model, batch)["sup"]
            total, count = total + float(summed), count + int(n)
            indices = batch["index"].tolist()
            for index, text in zip(indices, self.transcribe_clips(model, [self.eval_set[i]["audio"] for i in indices])):
                example = self.eval_set[index]
                results.append(
                    {"index": index, "audio": example["source"], "reference": example["text"], "prediction": text}
                )
        totals = gather([(total, count)])
        results = sorted(gather(results), key=lambda r: r["index"])
        loss = sum(t for t, _ in totals) / max(1, sum(n for _, n in totals))
        scores = speech_metrics([r["prediction"] for r in results], [r["reference"] for r in results])
        predictions = [{k: v for k, v in r.items() if k != "index"} for r in results]
        return {"loss": loss, **scores, "num_examples": len(results), "predictions": predictions}

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        predictions = metrics.pop("predictions", [])
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)

    def prediction_table(self, location: str) -> Any:
        """An audio folder, glob or file (one row per file), or rows of a data file / audiofolder."""
        import datasets

        field = self.recipe.data.audio_field
        files = audio_files(location, "--input")
        if files is not None:
            return datasets.Dataset.from_dict({field: files})
        return load_audio_rows(location, "--input", field, self.data_cache)

    def check_input(self, columns: list[str]) -> None:
        if self.recipe.data.audio_field not in columns:
            raise SftError(
                f"data.audio_field='{self.recipe.data.audio_field}': no such column in --input ({', '.join(columns)})"
            )

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        problems: list[Optional[str]] = []
        for number, row in enumerate(rows, first):
            value = row[self.recipe.data.audio_field]
            try:
                row["_audio"] = read_audio(value, self.rate) if value is not None else None
                problems.append(None if value is not None else "null audio")
            except AudioError as err:
                if not self.recipe.data.skip_invalid:
                    raise SftError(
                        f"--input row {number}: {audio_source(value)} is not a readable audio file ({err}) — fix or "
                        "remove it, or set data.skip_invalid: true to skip unreadable files"
                    ) from None
                problems.append("unreadable audio")
        return problems

    def predict_length(self, row: dict) -> int:
        return len(row["_audio"]) if row.get("_audio") is not None else 0

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        clips = [row.pop("_audio") for row in rows]
        texts = self.transcribe_clips(model, clips, settings)
        return [{"prediction": t, "duration": round(len(c) / self.rate, 3)} for t, c in zip(texts, clips)]


class WhisperTask(SpeechRecognitionTask):
    """Whisper-style encoder-decoders: log-mel features in, the tokenizer's transcript out, decoded by `generate`
    with the language and task tokens forced; the loss is on the transcript (and end) tokens only."""

    auto_class = AutoModelForSpeechSeq2Seq
    is_seq2seq = True

    def _processor(self, resolved: bb.ResolvedBackbone, texts: list[str]) -> None:
        from transformers import AutoFeatureExtractor, AutoTokenizer

        try:
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(resolved.location)
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.location)
        except (OSError, ValueError) as err:
            raise SftError(
                f"backbone.name: {resolved.location} has no feature extractor and tokenizer ({str(err).splitlines()[0]}) "
                "— an encoder-decoder speech model needs both (Whisper's processor files)"
            ) from None
        self.built_vocabulary = False
        self._prefix()

    def _prefix(self) -> None:
        """The decoder's start: <|startoftranscript|> <|lang|> <|task|> <|notimestamps|> (Whisper's convention)."""
        data = self.recipe.data
        if hasattr(self.tokenizer, "set_prefix_tokens"):
            language = data.language
            if language is not None and f"<|{language}|>" not in self.tokenizer.get_vocab():
                from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

                code = TO_LANGUAGE_CODE.get(language.lower())
                if code is None or f"<|{code}|>" not in self.tokenizer.get_vocab():
                    raise SftError(f"data.language: '{language}' is not a language this tokenizer has a token for")
                language = code
            self.tokenizer.set_prefix_tokens(language=language, task=data.asr_task, predict_timestamps=False)
            self.language = language
        else:
            self.language = None

    def _build_model(self, resolved: bb.ResolvedBackbone) -> None:
        self.model = bb.load_model(AutoModelForSpeechSeq2Seq, resolved, self.recipe.backbone, "eager")
        self.model = bb.apply_freeze(self.model, self.recipe.freeze)
        if self.recipe.freeze.feature_encoder is not None:
            self._freeze_feature_encoder(pretrained=True)
        self._configure_generation(bb.unwrap(self.model))

    def _configure_generation(self, model: Any) -> None:
        """The generation config Whisper checkpoints ship (language / task token maps, no timestamps), so that
        `generate` — ours, or the exported model's in `pipeline(...)` — starts with training's decoder prefix."""
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        vocabulary, generation = self.tokenizer.get_vocab(), model.generation_config
        generation.lang_to_id = {f"<|{c}|>": vocabulary[f"<|{c}|>"] for c in LANGUAGES if f"<|{c}|>" in vocabulary}
        generation.task_to_id = {
            t: vocabulary[f"<|{t}|>"] for t in ("transcribe", "translate") if f"<|{t}|>" in vocabulary
        }
        generation.no_timestamps_token_id = vocabulary.get("<|notimestamps|>")
        generation.is_multilingual = bool(generation.lang_to_id)
        generation.language = self.language
        generation.task = self.recipe.data.asr_task if generation.task_to_id else None
        generation.return_timestamps = False
        generation.forced_decoder_ids = None
        generation.decoder_start_token_id = self.tokenizer.prefix_tokens[0]
        generation.eos_token_id = self.tokenizer.eos_token_id
        generation.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        generation.max_length = None
        # what the exported model's pipeline decodes with: the recipe's predict: settings, as sft predict does
        generation.max_new_tokens = self.new_tokens(model, self.recipe.predict.max_new_tokens)
        generation.num_beams = self.recipe.predict.num_beams
        model.config.decoder_start_token_id = generation.decoder_start_token_id

    def new_tokens(self, model: Any, wanted: int) -> int:
        """`max_new_tokens`, within the decoder's positions after the prefix (Whisper refuses more)."""
        room = getattr(model.config, "max_target_positions", None)
        return min(wanted, room - len(self.tokenizer.prefix_tokens)) if room else wanted

    def transcript_problem(self, text: str) -> Optional[str]:
        return None if text else "empty transcript"

    def label_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]  # prefix + transcript + <|endoftext|>

    def collate(self, rows: list[dict], train: bool) -> Batch:
        features = self.audio_inputs([r["audio"] for r in rows])
        sequences = [r["input_ids"] for r in rows]
        prefix = len(self.tokenizer.prefix_tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        decoder_inputs = pad_sequences([s[:-1] for s in sequences], pad)
        # labels[t] is the token after decoder_inputs[t]; the language / task / timestamp tokens are given, not learnt
        labels = pad_sequences([[-100] * (prefix - 1) + s[prefix:] for s in sequences], -100)
        return {
            "input_features": features["input_features"],
            "decoder_input_ids": decoder_inputs,
            "decoder_attention_mask": pad_sequences([[1] * (len(s) - 1) for s in sequences], 0),
            "labels": labels,
            "index": torch.tensor([r["index"] for r in rows]),
            "frames": torch.tensor([len(r["audio"]) * FRAMES_PER_SECOND // self.rate for r in rows]),
        }

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sup": (batch["labels"] != -100).sum()}

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        inputs = {k: batch[k] for k in ("input_features", "decoder_input_ids", "decoder_attention_mask")}
        logits = model(**inputs).logits
        labels = batch["labels"]
        summed = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        return {"sup": (summed, (labels != -100).sum())}

    def transcribe(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], settings: Any = None) -> list[str]:
        """Whisper's `generate` from the configured prefix, with the `eval:` (or `predict:`) search settings."""
        settings = settings or self.recipe.eval
        output = bb.unwrap(model).generate(
            input_features=inputs["input_features"],
            max_new_tokens=self.new_tokens(bb.unwrap(model), settings.max_new_tokens),
            num_beams=settings.num_beams,
        )
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def audio_inputs(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        with torch.autocast("cpu", enabled=False):  # log-mel features in fp32, also inside a bf16 evaluation
            features = self.feature_extractor(
                clips, sampling_rate=self.rate, return_tensors="pt", return_attention_mask=False
            )
        return {"input_features": features["input_features"]}

    def load_for_inference(self, model_dir: str) -> None:
        super().load_for_inference(model_dir)
        self._prefix()
        self._configure_generation(bb.unwrap(self.model))
