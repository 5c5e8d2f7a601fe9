"""Generative SFT on prompt/response pairs and conversations: loss on what the assistant says.

Data shapes (messages, sharegpt, alpaca, pairs) and chat templates live in `sft_cli.chat`; rows become
examples in `generation_data`; packing in `sft_cli.data.packing`; decoding in `sft_cli.model.decoding`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForCausalLM

from sft_cli.chat.formats import conversation_column, detect_format, role_names, tools_of
from sft_cli.chat.masks import ChatEncoder, MaskError
from sft_cli.chat.templates import prepare_tokenizer
from sft_cli.data.packing import (
    PackedRows,
    isolation_mode,
    pack_best_fit,
    packed_attention,
    packing_efficiency,
    pad_sequences,
)
from sft_cli.data.tables import load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.decoding import generate
from sft_cli.model.lm_loss import causal_lm_loss, with_loss
from sft_cli.model.losses import shift_for_next_token
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.generation_data import (
    RowReader,
    encode_split,
    eval_turns,
    history_summary,
    render_prompt,
    trained_tokens_per_role,
)
from sft_cli.tasks.generation_infer import GENERATION_FILE, GenerationPredictor, decode_settings, set_stop_tokens
from sft_cli.tasks.metrics import generation_report
from sft_cli.tasks.text import (
    backbone_tokenizer,
    ensure_pad_token,
    fit_config_to_tokenizer,
    load_tokenizer,
    pack_texts,
)

log = logging.getLogger(__name__)
VERIFY_ROWS = 32  # real rows whose prefixes are tokenized on their own at start-up


class GenerationTask(Task):
    """Causal-LM fine-tuning on pairs or conversations; eval with exact match, BLEU, ROUGE-L, stop rate."""

    main_metric = "eval_loss"
    main_mode = "min"
    auto_class = AutoModelForCausalLM
    shardable = False  # eval decodes free-running per rank

    @classmethod
    def variant(cls, recipe: Any) -> type[Task]:
        """Encoder-decoder backbones (T5, BART, Marian, ...) run as sequence-to-sequence (`tasks.seq2seq`)."""
        from sft_cli.tasks.seq2seq import Seq2SeqTask

        try:
            seq2seq = bb.is_encoder_decoder(recipe.backbone)
        except SftError:  # the backbone is out of reach (offline): a trained run's model/ says what it is
            saved = Path(recipe.output.dir) / "model" / "config.json"
            if not saved.exists():
                raise
            seq2seq = bool(json.loads(saved.read_text()).get("is_encoder_decoder"))
        return Seq2SeqTask if seq2seq else cls

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        recipe, data, spec = self.recipe, self.recipe.data, self.recipe.backbone
        resolved = bb.resolve(spec) if train else None
        self.tokenizer = backbone_tokenizer(resolved, spec) if train else load_tokenizer(model_dir, spec)
        tables = self._tables(train)
        configs = {key: config for key, _, config in self.train_locations()} if train else {}
        configs["data.eval"] = data
        shapes = [(table.column_names, configs[key]) for key, table in tables.items()]
        self.chat = self._chat_encoder(shapes, model_dir or spec.name)
        for key, config in configs.items():
            if self.chat is not None and config.template not in (None, "chat", data.template):
                raise SftError(
                    f"{key}.template: this mixture is rendered with the chat template (a source is a conversation, "
                    "or data.chat_template is set), so a source's own template would be ignored — remove it"
                )
        # columns, template, mask checks; each source of a mixture with its own data keys
        readers = {key: self._reader(table, key, configs[key]) for key, table in tables.items()}
        ensure_pad_token(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise SftError("backbone: generation needs a tokenizer with an EOS token so the model learns to stop")
        self.model = self._build_model(resolved) if train else bb.load_trained(AutoModelForCausalLM, model_dir)
        set_stop_tokens(bb.unwrap(self.model), self.tokenizer)
        self.isolation = None
        if train:
            encoded = self.mix_sources(
                [
                    encode_split(tables[key], readers[key], key, location, self.skipped, self.data_cache)[0]
                    for key, location, _ in self.train_locations()
                ]
            )
            self.role_tokens = trained_tokens_per_role(encoded)
            self.history = history_summary(encoded)
            self.train_set = self._maybe_pack(encoded)
            self.unlabeled = self._unlabeled() if recipe.loss.lm > 0 else None
            self.model = bb.apply_freeze(self.model, recipe.freeze, self.new_tokens)
        self.model, self.chunked = with_loss(self.model, len(self.tokenizer), recipe.engine.kernels)
        if "data.eval" in tables:
            reader = readers["data.eval"]
            self.eval_set, kept = encode_split(
                tables["data.eval"], reader, "data.eval", data.eval, self.skipped, self.data_cache
            )
            self.eval_prompts = self._eval_prompts(tables["data.eval"].select(kept), reader)

    def _tables(self, train: bool) -> dict[str, Any]:
        """data.train (each source of a mixture) when training, and data.eval, by recipe key."""
        splits = [(key, location) for key, location, _ in self.train_locations()] if train else []
        if self.recipe.data.eval:
            splits.append(("data.eval", self.recipe.data.eval))
        return {key: load_table(location, key, self.data_cache) for key, location in splits}

    # -- model and template ------------------------------------------------------------------

    def _chat_encoder(self, shapes: list[tuple[list[str], Any]], where: str) -> Optional[ChatEncoder]:
        """A chat encoder when any split (or mixture source) is conversational or a chat template is asked for;
        else None (pairs). `shapes` holds each split's columns and data keys."""
        data = self.recipe.data
        pairs = all(
            detect_format(columns, config.format, config.messages_field) == "prompt-response"
            and config.template != "chat"
            for columns, config in shapes
        )
        if pairs and data.chat_template is None:
            return None
        template = prepare_tokenizer(self.tokenizer, data.chat_template, where)
        if template.end_of_turn is None:
            log.warning(
                "data.chat_template: %s writes no end-of-turn marker after a reply; sft appends EOS (%s) to each "
                "trained reply so the model learns to stop",
                template.source,
                self.tokenizer.eos_token,
            )
        return ChatEncoder(self.tokenizer, template, self.recipe.loss.train_on, data.history)

    def _build_model(self, resolved: bb.ResolvedBackbone) -> torch.nn.Module:
        spec, tokenizer = self.recipe.backbone, self.tokenizer
        if spec.from_scratch:
            fit_config_to_tokenizer(resolved.config, tokenizer, self.recipe.data.max_length)
        attention = bb.attention_implementation(self.recipe.engine.attention, self.recipe.engine.device)
        model = bb.load_model(AutoModelForCausalLM, resolved, spec, attention)
        rows = model.get_input_embeddings().num_embeddings
        self.new_tokens = list(range(rows, len(tokenizer))) if not spec.from_scratch else []
        if rows < len(tokenizer):  # template or pad tokens were added
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def _reader(self, table: Any, key: str, data: Any = None) -> RowReader:
        """How to read a split (with `data`'s keys: a mixture source's own), checking its columns; conversational
        rows verify the mask on real rows."""
        data = data or self.recipe.data
        fmt = detect_format(table.column_names, data.format, data.messages_field)
        if fmt != "prompt-response" and self.chat is None:
            raise SftError(f"{key}: conversational rows ({fmt}) but no chat template — set data.chat_template")
        column = conversation_column(fmt, data.messages_field)
        needed = {"alpaca": ["instruction", "output"], "prompt-response": [data.prompt_field, data.response_field]}
        require_columns(table, needed.get(fmt, [column]), "data.messages_field" if column else "data.format", key)
        reader = RowReader(fmt, column, role_names(dict(data.roles)), data, self.chat, self.tokenizer)
        if self.chat is not None:
            self._verify(table, reader, key)
        else:
            render_prompt(str(table[0][data.prompt_field]), data.template)  # a bad format string fails here, once
        return reader

    def _verify(self, table: Any, reader: RowReader, key: str) -> None:
        """Cross-check a template's `{% generation %}` markers against the mask on real rows, before training.

        Rows whose mask cannot be made are reported (or skipped) with their row number when the split is encoded.
        """
        from sft_cli.chat.formats import InvalidConversation

        samples = []
        for index in range(min(VERIFY_ROWS, len(table))):
            row = table[index]
            if reader.null_reason(row):
                continue
            try:
                messages, tools = reader.messages(row), tools_of(row)
                self.chat.encode(messages, tools)
            except (InvalidConversation, MaskError):
                continue
            samples.append((messages, tools))
        try:
            self.chat.verify(samples)
        except (MaskError, InvalidConversation) as err:
            raise SftError(f"data.chat_template: {self.chat.template.source} on {key}: {err}") from None

    def _maybe_pack(self, encoded: Any) -> Any:
        data = self.recipe.data
        if not data.packing:
            return encoded
        model = bb.unwrap(self.model)
        self.isolation = isolation_mode(model, min(len(self.tokenizer), model.get_input_embeddings().num_embeddings))
        if self.isolation is None:
            raise SftError(
                f"data.packing: {model.config.model_type} does not keep packed examples apart here — set data.packing: false"
            )
        lengths = encoded["length"]
        groups = pack_best_fit(lengths, data.max_length)
        rows = [encoded[g] for g in groups]  # column-wise dict per group
        packed = [{"input_ids": r["input_ids"], "trained": r["trained"]} for r in rows]
        return PackedRows(packed, packing_efficiency(lengths, groups, data.max_length))

    def _unlabeled(self) -> Any:
        if not self.recipe.data.unlabeled:
            raise SftError("loss.lm: generation takes its LM loss from data.unlabeled — set it to a text corpus")
        table = load_table(self.recipe.data.unlabeled, "data.unlabeled", self.data_cache)
        require_columns(table, [self.recipe.data.text_field], "data.text_field", "data.unlabeled")
        return pack_texts(
            table,
            self.tokenizer,
            self.recipe.data.text_field,
            self.recipe.data.max_length,
            "clm",
            "data.unlabeled",
            self.data_cache,
        )

    def _eval_prompts(self, table: Any, reader: RowReader) -> list[dict[str, Any]]:
        """For each eval row: the prompt ids the model continues, the reference, and what predictions.jsonl shows."""
        data, prompts = self.recipe.data, []
        for row in table:
            if reader.chat is None:
                text = render_prompt(str(row[data.prompt_field]), data.template)
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][-data.max_length :]
                prompts.append(
                    {"ids": ids, "reference": str(row[data.response_field]), "show": {"prompt": row[data.prompt_field]}}
                )
                continue
            history, reference = eval_turns(row, reader)
            ids = reader.chat.prompt_ids(history, tools_of(row))
            show = {"messages": history} if reader.fmt != "prompt-response" else {"prompt": row[data.prompt_field]}
            prompts.append({"ids": ids, "reference": reference, "show": show})
        return prompts

    # -- batches and loss ---------------------------------------------------------------------

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        if isinstance(table, PackedRows):
            return table.lengths()
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        pad, prompt_weight = self.tokenizer.pad_token_id, self.recipe.loss.prompt
        sequences, weights, segments, positions = [], [], [], []
        for row in rows:
            examples = (
                zip(row["input_ids"], row["trained"])
                if isinstance(row["input_ids"][0], list)
                else [(row["input_ids"], row["trained"])]
            )
            ids, w, seg, pos = [], [], [], []
            for number, (example, trained) in enumerate(examples):
                ids += example
                w += [1.0 if t else prompt_weight for t in trained]
                seg += [number] * len(example)
                pos += list(range(len(example)))
            sequences.append(ids)
            weights.append(w)
            segments.append(seg)
            positions.append(pos)
        input_ids = pad_sequences(sequences, pad, buckets=self.length_buckets)
        length = input_ids.shape[1]
        token_weights = torch.zeros(input_ids.shape)
        for i, w in enumerate(weights):
            token_weights[i, : len(w)] = torch.tensor(w)
        segment_ids = pad_sequences(segments, -1, length)
        # Position t predicts token t+1, only inside one example: shift labels and weights together.
        labels = shift_for_next_token(input_ids.masked_fill(token_weights == 0, -100))
        labels[shift_for_next_token(segment_ids) != segment_ids] = -100
        batch = {
            "input_ids": input_ids,
            "attention_mask": (segment_ids >= 0).long(),
            "labels": labels,
            "label_weights": torch.cat([token_weights[:, 1:], torch.zeros(len(rows), 1)], dim=1),
            "position_ids": pad_sequences(positions, 0, length),
            "segment_ids": segment_ids,
        }
        if train and getattr(self, "unlabeled", None) is not None:
            picks = torch.randint(len(self.unlabeled), (len(rows),)).tolist()
            blocks = [self.unlabeled[i]["input_ids"] for i in picks]
            lm_ids = pad_sequences(blocks, pad, buckets=self.length_buckets)
            lm_mask = pad_sequences([[1] * len(b) for b in blocks], 0, lm_ids.shape[1])
            batch["lm_input_ids"], batch["lm_attention_mask"] = lm_ids, lm_mask
            batch["lm_labels"] = shift_for_next_token(lm_ids.masked_fill(lm_mask == 0, -100))
        return batch

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        counts = {"sup": batch["label_weights"].masked_fill(batch["labels"] == -100, 0).sum()}
        if "lm_labels" in batch:
            counts["lm"] = (batch["lm_labels"] != -100).sum()
        return counts

    def attention_inputs(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """position_ids, plus the attention mask unless the model isolates packed examples from position_ids."""
        inputs = {"position_ids": batch["position_ids"]}
        if int(batch["segment_ids"].max()) > 0 and self.isolation == "position_ids":
            return inputs  # padding-free: no T x T mask at all
        if int(batch["segment_ids"].max()) > 0:
            inputs["attention_mask"] = packed_attention(
                batch["segment_ids"], bb.compute_dtype(model, batch["input_ids"].device)
            )
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        return inputs

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        labels = batch["labels"]
        weights = batch["label_weights"].masked_fill(labels == -100, 0)
        chunked = getattr(self, "chunked", False)
        summed = causal_lm_loss(
            model, chunked, batch["input_ids"], labels, weights, **self.attention_inputs(model, batch)
        )
        terms = {"sup": (summed, weights.sum())}
        if "lm_labels" in batch:
            lm = causal_lm_loss(
                model, chunked, batch["lm_input_ids"], batch["lm_labels"], attention_mask=batch["lm_attention_mask"]
            )
            terms["lm"] = (lm, (batch["lm_labels"] != -100).sum())
        return terms

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def summary_extras(self) -> dict[str, Any]:
        extras: dict[str, Any] = {"trained_tokens_per_role": getattr(self, "role_tokens", None)}
        if isinstance(self.train_set, PackedRows):
            extras["packing_efficiency"] = round(self.train_set.efficiency, 4)
        if getattr(self, "history", None):
            template = self.chat.template
            stop = template.end_of_turn or f"{self.tokenizer.eos_token} (appended: the template writes none)"
            extras["chat_history"] = {**self.history, "end_of_turn": stop}
        return extras

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        total, count = 0.0, 0.0
        for batch in batches:
            summed, n = self.loss_terms(model, {k: v for k, v in batch.items() if not k.startswith("lm_")})["sup"]
            total += float(summed)
            count += float(n)
        totals = gather([(total, count)])  # before decoding, as every process runs the collectives in one order
        return generation_report(totals, self.generate_all(bb.unwrap(model), gather) if final else None)

    def generate_all(self, model: torch.nn.Module, gather: Any) -> list[dict[str, Any]]:
        """Decode the final reply of every eval example, sharded over processes, returned in file order."""
        from accelerate import PartialState

        state, settings = PartialState(), self.recipe.eval
        decode = decode_settings(settings)
        mine = list(range(len(self.eval_prompts)))[state.process_index :: state.num_processes]
        mine.sort(key=lambda i: len(self.eval_prompts[i]["ids"]))  # similar lengths together: little padding
        results = []
        for start in range(0, len(mine), settings.batch_size):
            chunk = mine[start : start + settings.batch_size]
            outputs = generate(model, self.tokenizer, [self.eval_prompts[i]["ids"] for i in chunk], decode)
            for index, output in zip(chunk, outputs):
                example = self.eval_prompts[index]
                results.append(
                    {
                        "index": index,
                        **example["show"],
                        "reference": example["reference"],
                        "prediction": output.text,
                        "stopped": output.stopped,
                    }
                )
        ordered = sorted(gather(results), key=lambda r: r["index"])
        return [{k: v for k, v in r.items() if k != "index"} for r in ordered]

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)
        info = {"chat": self.chat is not None, "template": self.recipe.data.template}
        (directory / GENERATION_FILE).write_text(json.dumps(info, indent=2) + "\n")

    # -- using a trained model: the predictor does the work -----------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        self.predictor, self.model = GenerationPredictor.load(self.recipe, model_dir)
        self.tokenizer, self.chat = self.predictor.tokenizer, self.predictor.chat

    def check_input(self, columns: list[str]) -> None:
        self.predictor.check_input(columns)

    def predict_length(self, row: dict) -> int:
        return self.predictor.predict_length(row)

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        return self.predictor.row_problems(rows, first)

    def prompt_ids(self, messages: list, tools: Any = None) -> list[int]:
        """Token ids of a conversation (or a lone prompt) with the generation prompt, as training rendered it."""
        return self.predictor.prompt_ids(messages, tools)

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        return self.predictor.predict(model, rows, settings)

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        predictions = metrics.pop("predictions", [])
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
