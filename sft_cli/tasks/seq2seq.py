"""Encoder-decoder generation (T5, BART, Marian, mBART / NLLB, Pegasus): a source text in, a target text out.

`task: generation` runs here when the backbone's config is an encoder-decoder's. Rows are source/target pairs:
`data.prompt_field` / `data.response_field`, or Hugging Face translation rows (`data.format: translation`,
`{"translation": {lang: text}}`, read with `data.source_lang` / `data.target_lang`). `data.template` wraps the
source ("translate English to Spanish: {prompt}"). The loss is on the target tokens only (the decoder's labels),
without the full logits (`Seq2SeqLMLoss`); eval decodes with the `eval:` search settings and scores chrF++,
METEOR, BLEU and ROUGE-L. Multilingual models (NLLB, mBART) get their language codes from the two lang keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForSeq2SeqLM

from sft_cli.data.packing import pad_sequences
from sft_cli.data.tables import (
    cached_map,
    drop_null_rows,
    load_table,
    require_columns,
    require_columns_named,
    text_problem,
)
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.decoding import generate
from sft_cli.model.lm_loss import seq2seq_loss, with_seq2seq_loss
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.generation_data import render_prompt
from sft_cli.tasks.generation_infer import GENERATION_FILE, decode_settings
from sft_cli.tasks.lm_aux import aux_counts, check_objective_tokens, lm_inputs, pick_objective
from sft_cli.tasks.metrics import generation_report
from sft_cli.tasks.text import (
    backbone_tokenizer,
    ensure_pad_token,
    fit_config_to_tokenizer,
    load_tokenizer,
    pack_texts,
    text_batch,
    tokenizer_fingerprint,
)

TRANSLATION_COLUMN = "translation"
SOURCE_TEMPLATE = "{prompt}"  # no data.template: the source as it is
CONVERSATIONAL = ("messages", "sharegpt", "alpaca")


# ISO 639-3 codes (NLLB's eng_Latn, ...) of common languages -> the ISO 639-1 keys of translation rows (en, ...)
ISO_639_1 = {
    "ara": "ar", "ces": "cs", "dan": "da", "deu": "de", "ell": "el", "eng": "en", "est": "et", "fin": "fi",
    "fra": "fr", "heb": "he", "hin": "hi", "hun": "hu", "ind": "id", "ita": "it", "jpn": "ja", "kor": "ko",
    "lit": "lt", "lvs": "lv", "nld": "nl", "nob": "nb", "pol": "pl", "por": "pt", "ron": "ro", "rus": "ru",
    "slk": "sk", "slv": "sl", "spa": "es", "swe": "sv", "tur": "tr", "ukr": "uk", "vie": "vi", "zho": "zh",
}  # fmt: skip


def language_key(available: Iterable[str], lang: str) -> Optional[str]:
    """The key of a translation row for a language code: itself, or its language part (en_XX -> en; NLLB's
    eng_Latn -> eng, else en), as run_translation.py reads rows for mBART and NLLB codes."""
    keys = list(available)
    short = lang.split("_")[0]
    for candidate in (lang, short, ISO_639_1.get(short)):
        if candidate in keys:
            return candidate
    return next((k for k in keys if k.split("_")[0] == short), None)


def set_languages(tokenizer: Any, source: Optional[str], target: Optional[str]) -> dict[str, int]:
    """Tell a multilingual tokenizer (NLLB, mBART, M2M100) its languages; returns how generation starts with the
    target language: mBART-cc25 starts its decoder at the language token, the others force it first (forced BOS)."""
    if not hasattr(tokenizer, "tgt_lang") or not target:
        return {}
    if source and hasattr(tokenizer, "src_lang"):
        tokenizer.src_lang = source
    tokenizer.tgt_lang = target
    token = tokenizer.convert_tokens_to_ids(target)
    if token is None or token == tokenizer.unk_token_id:
        codes = list(getattr(tokenizer, "lang_code_to_id", None) or [])[:3] or ["spa_Latn", "es_XX"]
        raise SftError(
            f"data.target_lang: '{target}' is not a language code of this tokenizer (e.g. {', '.join(codes)})"
        )
    if type(tokenizer).__name__.startswith("MBartTokenizer"):  # cc25, as run_translation.py sets it
        return {"decoder_start_token_id": token}
    return {"forced_bos_token_id": token}


def configure_generation(model: Any, tokenizer: Any, language: dict[str, int]) -> None:
    """Stop at EOS, pad with the pad token, start the decoder as the model was trained to (and on the target
    language for multilingual models) — in config and generation_config, which `save_pretrained` keeps."""
    config = model.config
    if getattr(config, "decoder_start_token_id", None) is None:  # T5's convention: the decoder starts at the pad token
        config.decoder_start_token_id = tokenizer.pad_token_id
    updates = {
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        **language,
    }
    if getattr(config, "forced_eos_token_id", None) is not None:
        updates["forced_eos_token_id"] = tokenizer.eos_token_id
    for target in (config, model.generation_config):
        for name, value in updates.items():
            setattr(target, name, value)


def set_search_defaults(model: Any, settings: Any) -> None:
    """The recipe's `predict:` search settings as the model's generation_config (what the saved pipeline and
    `generate` without arguments use), beam-only ones reset without beams; checked now, not at the first save."""
    from transformers import GenerationConfig

    config, default = model.generation_config, GenerationConfig()
    config.max_new_tokens = settings.max_new_tokens
    config.num_beams = settings.num_beams
    config.no_repeat_ngram_size = settings.no_repeat_ngram_size
    config.do_sample = settings.do_sample
    sampling = ("temperature", "top_p", "top_k")
    for name in sampling:  # a backbone's sampling settings would be invalid without do_sample
        setattr(
            config,
            name,
            getattr(settings, name, None) if settings.do_sample and name != "top_k" else getattr(default, name),
        )
    beam_only = ("length_penalty", "early_stopping", "num_beam_groups", "diversity_penalty")
    for name in beam_only:
        setattr(config, name, getattr(default, name))
    if settings.num_beams > 1:
        config.length_penalty = settings.length_penalty
        config.early_stopping = True
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise SftError(f"predict: these search settings are not valid together: {str(err).splitlines()[0]}") from None


class Seq2SeqTask(Task):
    """Sequence-to-sequence fine-tuning on source/target pairs; eval with chrF++, METEOR, BLEU, ROUGE-L."""

    main_metric = "eval_loss"
    main_mode = "min"
    auto_class = AutoModelForSeq2SeqLM
    shardable = False  # eval decodes free-running per rank

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        if data.packing and train:
            raise SftError(
                "data.packing: an encoder-decoder trains on one source/target pair per row (its encoder would "
                "attend across packed sources) — set data.packing: false"
            )
        resolved = bb.resolve(self.recipe.backbone) if train else None
        self._tokenizer(resolved, model_dir)
        locations = self.train_locations() if train else []
        splits = [(key, location) for key, location, _ in locations]
        splits += [("data.eval", data.eval)] if data.eval else []
        tables = {key: load_table(location, key, self.data_cache) for key, location in splits}
        for key, _, config in locations:  # each source of a mixture with its own data keys
            with self.reading(config):
                self._check_columns(tables[key].column_names, key)
        if "data.eval" in tables:
            self._check_columns(tables["data.eval"].column_names, "data.eval")
        self._model(resolved, model_dir)
        self.unlabeled = None
        if train:
            parts, template = [], self.template
            for key, location, config in locations:
                with self.reading(config):
                    self.input_format = self._check_columns(tables[key].column_names, key)
                    self.template = config.template if config.template != data.template else template
                    parts.append(self._encode(tables[key], key, location))
            self.template = template  # what predictions and the export use: the recipe-wide one
            self.train_set = self.mix_sources(parts)
            if self.recipe.loss.lm > 0:
                self.unlabeled = self._unlabeled()
            self.model = bb.apply_freeze(self.model, self.recipe.freeze)
        self.model, self.chunked = with_seq2seq_loss(self.model, len(self.tokenizer), self.recipe.engine.kernels)
        if "data.eval" in tables:
            self.input_format = self._check_columns(tables["data.eval"].column_names, "data.eval")
            self.eval_set = self._encode(tables["data.eval"], "data.eval", data.eval)

    def _tokenizer(self, resolved: Optional[bb.ResolvedBackbone], model_dir: Optional[str]) -> None:
        """The tokenizer, how sources are written (template, languages) and the target language's token."""
        spec = self.recipe.backbone
        self.tokenizer = backbone_tokenizer(resolved, spec) if resolved else load_tokenizer(model_dir, spec)
        ensure_pad_token(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise SftError("backbone: generation needs a tokenizer with an EOS token so the model learns to stop")
        info = self._info(model_dir)
        self.template, self.source_lang, self.target_lang = info["template"], info["source_lang"], info["target_lang"]
        self.language = set_languages(self.tokenizer, self.source_lang, self.target_lang)

    def _model(self, resolved: Optional[bb.ResolvedBackbone], model_dir: Optional[str]) -> None:
        """The backbone to train (its embeddings grown when a pad token was added), or a trained model."""
        if resolved is not None:
            if self.recipe.backbone.from_scratch:  # fresh weights follow the tokenizer
                fit_config_to_tokenizer(resolved.config, self.tokenizer, self.recipe.data.max_length)
            self.model = bb.load_model(AutoModelForSeq2SeqLM, resolved, self.recipe.backbone)
            if len(self.tokenizer) > self.model.get_input_embeddings().num_embeddings:
                self.model.resize_token_embeddings(len(self.tokenizer))
        else:
            self.model = bb.load_trained(AutoModelForSeq2SeqLM, model_dir)
        network = bb.unwrap(self.model)
        configure_generation(network, self.tokenizer, self.language)
        set_search_defaults(network, self.recipe.predict)

    def _info(self, model_dir: Optional[str]) -> dict[str, Any]:
        """How sources are written (template, languages): recorded in a trained model's directory, else the recipe's."""
        path = Path(model_dir) / GENERATION_FILE if model_dir else None
        if path is not None and path.exists():
            saved = json.loads(path.read_text())
            if saved.get("seq2seq"):
                return saved
        data = self.recipe.data
        return {"template": data.template, "source_lang": data.source_lang, "target_lang": data.target_lang}

    def _unlabeled(self) -> Any:
        """`loss.lm`: blocks of data.unlabeled for the span-corruption (T5-like) or infilling (BART-like) term."""
        data = self.recipe.data
        if not data.unlabeled:
            raise SftError(
                "loss.lm: an encoder-decoder takes its span-corruption loss from data.unlabeled — set it to a text corpus"
            )
        self.lm_objective = pick_objective(self.recipe.objective, bb.unwrap(self.model).config)
        check_objective_tokens(self.lm_objective, self.tokenizer)
        table = load_table(data.unlabeled, "data.unlabeled", self.data_cache)
        require_columns(table, [data.text_field], "data.text_field", "data.unlabeled")
        table = drop_null_rows(
            table, [data.text_field], "data.unlabeled", self.skipped, [data.text_field], data.skip_invalid
        )
        block = data.max_length - 1  # the corrupted source and its target end with EOS
        return pack_texts(
            table, self.tokenizer, data.text_field, block, self.lm_objective, "data.unlabeled", self.data_cache
        )

    # -- rows ---------------------------------------------------------------------------------------

    def _check_columns(self, columns: list[str], key: str) -> str:
        """The split's row format (prompt-response or translation), or a one-line error naming what is missing."""
        data = self.recipe.data
        fmt = data.format
        if fmt == "auto":
            fmt = (
                "translation"
                if TRANSLATION_COLUMN in columns and data.prompt_field not in columns
                else "prompt-response"
            )
        if fmt in CONVERSATIONAL:
            raise SftError(
                f"data.format: {fmt} rows are conversations; an encoder-decoder model trains on source/target pairs "
                "— use prompt/response columns (data.prompt_field, data.response_field) or data.format: translation"
            )
        if fmt == "translation":
            require_columns_named(columns, [TRANSLATION_COLUMN], "data.format", key)
            for name in ("source_lang", "target_lang"):
                if not getattr(self, name):
                    raise SftError(
                        f"data.{name}: translation rows need the {name.split('_')[0]} language's key "
                        f"(e.g. data.source_lang: en, data.target_lang: es)"
                    )
        else:
            require_columns_named(columns, [data.prompt_field], "data.prompt_field", key)
            if key != "--input":
                require_columns_named(columns, [data.response_field], "data.response_field", key)
        return fmt

    def _pair(self, row: dict, where: str, target: bool = True) -> tuple[Any, Any]:
        """(source, target) values of a row in its format (None where absent)."""
        data = self.recipe.data
        if self.input_format != "translation":
            return row.get(data.prompt_field), row.get(data.response_field) if target else None
        pair = row.get(TRANSLATION_COLUMN)
        if pair is None:
            return None, None  # a null row: skipped and counted
        if not isinstance(pair, dict):
            raise SftError(f"{where}: '{TRANSLATION_COLUMN}' is not a {{language: text}} object — fix the row")
        values = []
        for lang, name in ((self.source_lang, "source_lang"), (self.target_lang, "target_lang")):
            if name == "target_lang" and not target:
                values.append(None)
                continue
            found = language_key(pair, lang)
            values.append(pair[found] if found else None)  # a row without the language is a null row
        return values[0], values[1]

    def source_ids(self, text: str) -> list[int]:
        """The encoder's input: the templated source, cut to data.max_length, ending with EOS."""
        ids = self.tokenizer(render_prompt(text, self.template or SOURCE_TEMPLATE), add_special_tokens=True)[
            "input_ids"
        ]
        return self._ending_with_eos(ids, self.recipe.data.max_length)

    def target_ids(self, text: str) -> list[int]:
        """The decoder's labels: the target as the tokenizer writes a target, cut to data.max_target_length,
        ending with EOS (so the model learns to stop, also with tokenizers that add no specials)."""
        ids = self.tokenizer(text_target=text, add_special_tokens=True)["input_ids"]
        return self._ending_with_eos(ids, self.recipe.data.max_target_length or self.recipe.data.max_length)

    def _ending_with_eos(self, ids: list[int], limit: int) -> list[int]:
        """At most `limit` tokens ending as the tokenizer ends a text — EOS, or EOS and a language code (mBART-cc25)
        — kept when the text is cut; EOS is added when the tokenizer adds nothing."""
        eos = self.tokenizer.eos_token_id
        tail = ids[-2:]
        suffix = tail[tail.index(eos) :] if eos in tail else [eos]
        body = ids[: len(ids) - len(suffix)] if eos in tail else ids
        return body[: limit - len(suffix)] + suffix

    def _encode(self, table: Any, key: str, location: Any) -> Any:
        """Tokenize every row (cached); null rows are counted and skipped, empty or non-text ones are errors."""
        data = self.recipe.data
        if self.input_format == "translation":
            self._check_languages(table, key, location)

        def encode(rows: dict[str, list], indices: list[int]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "skip": []}
            for offset, index in enumerate(indices):
                row = {name: values[offset] for name, values in rows.items()}
                where = f"{key}: {location} row {index + 1}"
                source, target = self._pair(row, where)
                problem = self._row_problem(source, target, where)
                ids = self.source_ids(source) if not problem else []
                labels = self.target_ids(target) if not problem else []
                for name, value in zip(out, (ids, labels, len(ids) + len(labels), problem or "")):
                    out[name].append(value)
            return out

        fingerprint = (
            "seq2seq-v1",
            self.input_format,
            data.prompt_field,
            data.response_field,
            self.source_lang,
            self.target_lang,
            self.template,
            data.max_length,
            data.max_target_length,
            data.skip_invalid,
            tokenizer_fingerprint(self.tokenizer),
        )
        encoded = cached_map(table, encode, str(fingerprint), with_indices=True, cache=self.data_cache)
        reasons = encoded["skip"]
        for reason in sorted(set(reasons) - {""}):
            self.skipped.add(key, reason, reasons.count(reason))
        if all(reasons):
            raise SftError(f"{key}: no usable example in {location} ({self.skipped.describe(key)})")
        if any(reasons):
            encoded = encoded.select([i for i, reason in enumerate(reasons) if not reason])
        if key == "data.eval":  # the texts eval shows beside each prediction (and scores against)
            self.eval_texts = [self._pair(table[i], key) for i, reason in enumerate(reasons) if not reason]
        return encoded.remove_columns("skip")

    def _check_languages(self, table: Any, key: str, location: Any) -> None:
        """Both languages are keys of some translation row (a row lacking one is skipped; no row having it is a typo)."""
        keys: set[str] = set()
        for pair in table[TRANSLATION_COLUMN]:
            if isinstance(pair, dict):
                keys |= {k for k, v in pair.items() if v is not None}
        for lang, name in ((self.source_lang, "source_lang"), (self.target_lang, "target_lang")):
            if language_key(keys, lang) is None:
                raise SftError(
                    f"data.{name}: no '{lang}' text in any '{TRANSLATION_COLUMN}' row of {key} ({location}; they have "
                    f"{', '.join(sorted(keys)) or 'nothing'}) — set data.{name} to one of them"
                )

    def _row_problem(self, source: Any, target: Any, where: str) -> Optional[str]:
        """Why a row is skipped (a null field), or an error for a non-text or empty source or target."""
        data = self.recipe.data
        for value, role, field in ((source, "source", data.prompt_field), (target, "target", data.response_field)):
            name = field if self.input_format != "translation" else f"{TRANSLATION_COLUMN}.{role}"
            problem = text_problem(value, name)
            if problem and problem.startswith("null"):
                return problem
            if problem or not str(value).strip():
                if data.skip_invalid:
                    return f"empty or non-text {role}"
                what = f"'{name}' is {type(value).__name__}, not text" if problem else f"the {role} '{name}' is empty"
                raise SftError(f"{where}: {what} — fix the row, or set data.skip_invalid: true to skip such rows")
        return None

    # -- batches and loss ---------------------------------------------------------------------------

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        sources, pad = [r["input_ids"] for r in rows], self.tokenizer.pad_token_id
        input_ids = pad_sequences(sources, pad, buckets=self.length_buckets)
        batch = {
            "input_ids": input_ids,
            "attention_mask": pad_sequences([[1] * len(s) for s in sources], 0, input_ids.shape[1]),
            "labels": pad_sequences([r["labels"] for r in rows], -100, buckets=self.length_buckets),
        }
        if train and getattr(self, "unlabeled", None) is not None:  # as many corrupted blocks as pairs
            picks = torch.randint(len(self.unlabeled), (len(rows),)).tolist()
            blocks = text_batch([self.unlabeled[i] for i in picks], pad, self.length_buckets)
            batch.update(lm_inputs(self.lm_objective, blocks, self.tokenizer))
        return batch

    def describe_target(self, row: dict) -> str:
        """`sft plan`: the decoder's labels, the only tokens the loss is on."""
        return f"  => [target, trained] {self.tokenizer.decode(row['labels'])}"

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sup": (batch["labels"] != -100).sum(), **aux_counts(batch)}

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        terms = {"sup": (seq2seq_loss(model, self.chunked, batch), (batch["labels"] != -100).sum())}
        if "lm_labels" in batch:
            labels = batch["lm_labels"]
            pair = {"input_ids": batch["lm_input_ids"], "attention_mask": batch["lm_attention_mask"], "labels": labels}
            terms["lm"] = (seq2seq_loss(model, self.chunked, pair), (labels != -100).sum())
        return terms

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())

    # -- evaluation ---------------------------------------------------------------------------------

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        total, count = 0.0, 0.0
        for batch in batches:
            summed, n = self.loss_terms(model, batch)["sup"]
            total, count = total + float(summed), count + float(n)
        totals = gather([(total, count)])  # before decoding, as every process runs the collectives in one order
        return generation_report(totals, self.generate_all(bb.unwrap(model), gather) if final else None)

    def generate_all(self, model: torch.nn.Module, gather: Any) -> list[dict[str, Any]]:
        """Decode every eval source with the `eval:` settings, sharded over processes, returned in file order."""
        from accelerate import PartialState

        state, settings = PartialState(), self.recipe.eval
        sources = self.eval_set["input_ids"]
        mine = list(range(len(sources)))[state.process_index :: state.num_processes]
        mine.sort(key=lambda i: len(sources[i]))  # similar lengths together: little padding
        results = []
        for start in range(0, len(mine), settings.batch_size):
            chunk = mine[start : start + settings.batch_size]
            outputs = generate(model, self.tokenizer, [sources[i] for i in chunk], decode_settings(settings))
            for index, output in zip(chunk, outputs):
                source, reference = self.eval_texts[index]
                results.append(
                    {
                        "index": index,
                        "source": source,
                        "reference": reference,
                        "prediction": output.text,
                        "stopped": output.stopped,
                    }
                )
        ordered = sorted(gather(results), key=lambda r: r["index"])
        return [{k: v for k, v in r.items() if k != "index"} for r in ordered]

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        predictions = metrics.pop("predictions", [])
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)

    # -- model files and sft predict ----------------------------------------------------------------

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        from sft_cli.model.seq2seq_pipeline import copy_pipeline, custom_pipelines

        network = bb.unwrap(model)
        network = network.get_base_model() if hasattr(network, "get_base_model") else network
        # what the saved pipeline needs to write sources as training did
        network.config.sft_source_template = self.template or SOURCE_TEMPLATE
        network.config.sft_max_source_length = self.recipe.data.max_length
        network.config.custom_pipelines = custom_pipelines()
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)
        info = {
            "seq2seq": True,
            "template": self.template,
            "source_lang": self.source_lang,
            "target_lang": self.target_lang,
        }
        (directory / GENERATION_FILE).write_text(json.dumps(info, indent=2) + "\n")
        copy_pipeline(directory)

    def load_for_inference(self, model_dir: str) -> None:
        self._tokenizer(None, model_dir)
        self._model(None, model_dir)
        self.input_format = "translation" if self.recipe.data.format == "translation" else "prompt-response"

    def check_input(self, columns: list[str]) -> None:
        self.input_format = self._check_columns(columns, "--input")

    def predict_length(self, row: dict) -> int:
        source = self._pair(row, "--input", target=False)[0]
        return len(str(source or ""))

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        problems: list[Optional[str]] = []
        for number, row in enumerate(rows, first):
            source = self._pair(row, f"--input row {number}", target=False)[0]
            problem = text_problem(source, "source")
            if problem and not problem.startswith("null") and not self.recipe.data.skip_invalid:
                raise SftError(
                    f"--input row {number}: the source is {type(source).__name__}, not text — fix the row, or set "
                    "data.skip_invalid: true to skip such rows"
                )
            problems.append(problem)
        return problems

    def prompt_ids(self, messages: list, tools: Any = None) -> list[int]:
        """`sft chat`: the latest user message is the source (an encoder-decoder keeps no conversation)."""
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return self.source_ids(str(last or ""))

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        sources = [self.source_ids(str(self._pair(row, "--input", target=False)[0])) for row in rows]
        outputs = generate(bb.unwrap(model), self.tokenizer, sources, decode_settings(settings))
        return [{"prediction": o.text, "stopped": o.stopped, "num_tokens": len(o.ids)} for o in outputs]
