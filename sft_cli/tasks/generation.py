"""Generative SFT (prompt -> response): loss on response tokens only, optional packing, decoding metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from transformers import AutoModelForCausalLM

from sft_cli import backbone as bb
from sft_cli.data import cached_map, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.losses import shift_for_next_token, summed_cross_entropy
from sft_cli.metrics import generation_metrics, perplexity
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.language_modeling import pack_texts
from sft_cli.tasks.text import backbone_tokenizer, ensure_pad_token, load_tokenizer, pad_sequences

DEFAULT_TEMPLATE = "{prompt}\n"


def render_prompt(prompt: str, template: Optional[str], tokenizer: Any) -> str:
    """The text the model sees before the response: a format string, or the tokenizer's chat template."""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise SftError(
                "data.template: 'chat' needs a tokenizer with a chat template — use a format string like '{prompt} =>'"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    try:
        return (template or DEFAULT_TEMPLATE).format(prompt=prompt)
    except (KeyError, IndexError, ValueError) as err:
        raise SftError(f"data.template: '{template}' is not a format string with {{prompt}} ({err})") from None


def pack_examples(lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy packing in order: consecutive examples share a row while they fit in max_length."""
    rows: list[list[int]] = []
    used = max_length + 1
    for index, length in enumerate(lengths):
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def packed_attention(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal, and only within an example (block-diagonal); padding is segment -1."""
    same = segments[:, :, None] == segments[:, None, :]
    length = segments.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=segments.device))
    allowed = same & causal & (segments[:, :, None] >= 0)
    allowed |= torch.eye(length, dtype=torch.bool, device=segments.device)  # padding rows attend to themselves
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )[:, None]


class GenerationTask(Task):
    """Causal-LM fine-tuning on prompt/response pairs; eval with exact match, BLEU, ROUGE-L."""

    main_metric = "eval_loss"
    main_mode = "min"
    auto_class = AutoModelForCausalLM

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        recipe, data, spec = self.recipe, self.recipe.data, self.recipe.backbone
        if train:
            resolved = bb.resolve(spec)
            self.tokenizer = backbone_tokenizer(resolved, spec)
            added = ensure_pad_token(self.tokenizer)
            if spec.from_scratch:
                from sft_cli.tasks.language_modeling import _fit_config_to_tokenizer

                _fit_config_to_tokenizer(resolved.config, self.tokenizer, data.max_length)
            attention = bb.attention_implementation(recipe.engine.attention, recipe.engine.device)
            self.model = bb.load_model(AutoModelForCausalLM, resolved, spec, attention)
            if added or self.model.get_input_embeddings().num_embeddings < len(self.tokenizer):
                self.model.resize_token_embeddings(len(self.tokenizer))
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model = bb.apply_freeze(self.model, recipe.freeze)
        else:
            self.tokenizer = load_tokenizer(model_dir, spec)
            ensure_pad_token(self.tokenizer)
            self.model = bb.load_trained(AutoModelForCausalLM, model_dir)
        if train:
            self.train_set = self._encode(self._rows(data.train, "data.train"), "data.train", pack=data.packing)
            if data.packing:
                self._check_packing_support()
            self.unlabeled = self._unlabeled() if recipe.loss.lm > 0 else None
        if data.eval:
            self.eval_raw = self._rows(data.eval, "data.eval")
            self.eval_set = self._encode(self.eval_raw, "data.eval", pack=False)

    # -- data -------------------------------------------------------------------------------------

    def _rows(self, location: str, key: str) -> Any:
        """A split's rows with both fields present (rows with a null one are counted and left out)."""
        fields = [self.recipe.data.prompt_field, self.recipe.data.response_field]
        table = load_table(location, key)
        require_columns(table, fields, "data.prompt_field/response_field", key)
        return drop_null_rows(table, fields, key, self.skipped)

    def _encode(self, table: Any, key: str, pack: bool) -> Any:
        data, tokenizer = self.recipe.data, self.tokenizer
        template, max_length, eos = data.template, data.max_length, tokenizer.eos_token_id
        render_prompt(str(table[0][data.prompt_field]), template, tokenizer)  # a bad template fails here, once
        if eos is None:
            raise SftError("backbone: generation needs a tokenizer with an EOS token so the model learns to stop")

        def encode(rows: dict[str, list]) -> dict[str, list]:
            prompts = [render_prompt(str(p), template, tokenizer) for p in rows[data.prompt_field]]
            responses = [str(r) for r in rows[data.response_field]]
            p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
            out: dict[str, list] = {"input_ids": [], "prompt_length": [], "length": []}
            for p, r in zip(p_ids, r_ids):
                response = (r + [eos])[:max_length]
                prompt = p[-(max_length - len(response)) :] if max_length > len(response) else []
                out["input_ids"].append(prompt + response)
                out["prompt_length"].append(len(prompt))
                out["length"].append(len(prompt) + len(response))
            return out

        fingerprint = str(
            (
                "generation",
                data.prompt_field,
                data.response_field,
                template,
                max_length,
                tokenizer.name_or_path,
                len(tokenizer),
            )
        )
        encoded = cached_map(table, encode, fingerprint)
        if not pack:
            return encoded
        groups = pack_examples(encoded["length"], max_length)
        rows = [encoded[g] for g in groups]  # column-wise dict per group
        return _PackedRows([{"input_ids": r["input_ids"], "prompt_length": r["prompt_length"]} for r in rows])

    def _unlabeled(self) -> Any:
        if not self.recipe.data.unlabeled:
            raise SftError("loss.lm: generation takes its LM loss from data.unlabeled — set it to a text corpus")
        table = load_table(self.recipe.data.unlabeled, "data.unlabeled")
        require_columns(table, [self.recipe.data.text_field], "data.text_field", "data.unlabeled")
        return pack_texts(
            table, self.tokenizer, self.recipe.data.text_field, self.recipe.data.max_length, "clm", "data.unlabeled"
        )

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        if isinstance(table, _PackedRows):
            return table.lengths()
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        pad = self.tokenizer.pad_token_id
        prompt_weight = self.recipe.loss.prompt
        if rows and isinstance(rows[0]["input_ids"][0], list):  # packed rows: several examples each
            sequences, weights, segments, positions = [], [], [], []
            for row in rows:
                ids, w, seg, pos = [], [], [], []
                for number, (example, prompt_length) in enumerate(zip(row["input_ids"], row["prompt_length"])):
                    ids += example
                    w += [prompt_weight] * prompt_length + [1.0] * (len(example) - prompt_length)
                    seg += [number] * len(example)
                    pos += list(range(len(example)))
                sequences.append(ids)
                weights.append(w)
                segments.append(seg)
                positions.append(pos)
        else:
            sequences = [r["input_ids"] for r in rows]
            weights = [
                [prompt_weight] * r["prompt_length"] + [1.0] * (len(r["input_ids"]) - r["prompt_length"]) for r in rows
            ]
            segments = [[0] * len(s) for s in sequences]
            positions = [list(range(len(s))) for s in sequences]
        input_ids = pad_sequences(sequences, pad)
        length = input_ids.shape[1]
        token_weights = torch.zeros(input_ids.shape)
        for i, w in enumerate(weights):
            token_weights[i, : len(w)] = torch.tensor(w)
        segment_ids = pad_sequences(segments, -1, length)
        # Position t predicts token t+1, only inside one example: shift labels and weights together.
        labels = shift_for_next_token(input_ids.masked_fill(token_weights == 0, -100))
        next_segment = shift_for_next_token(segment_ids)
        labels[next_segment != segment_ids] = -100
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
            lm_ids = pad_sequences(blocks, pad)
            lm_mask = pad_sequences([[1] * len(b) for b in blocks], 0, lm_ids.shape[1])
            batch.update(
                {
                    "lm_input_ids": lm_ids,
                    "lm_attention_mask": lm_mask,
                    "lm_labels": shift_for_next_token(lm_ids.masked_fill(lm_mask == 0, -100)),
                }
            )
        return batch

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        counts = {"sup": batch["label_weights"].masked_fill(batch["labels"] == -100, 0).sum()}
        if "lm_labels" in batch:
            counts["lm"] = (batch["lm_labels"] != -100).sum()
        return counts

    def _forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if self.recipe.data.packing and int(batch["segment_ids"].max()) > 0:
            mask = packed_attention(batch["segment_ids"], _compute_dtype(model, batch["input_ids"].device))
            return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        return model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        weights = batch["label_weights"].masked_fill(batch["labels"] == -100, 0)
        terms = {"sup": (summed_cross_entropy(self._forward(model, batch), batch["labels"], weights), weights.sum())}
        if "lm_labels" in batch:
            logits = model(input_ids=batch["lm_input_ids"], attention_mask=batch["lm_attention_mask"]).logits
            terms["lm"] = (summed_cross_entropy(logits, batch["lm_labels"]), (batch["lm_labels"] != -100).sum())
        return terms

    def tokens(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def _check_packing_support(self) -> None:
        """Refuse packing unless this backbone honours the block-diagonal mask (checked, not assumed)."""
        model = bb.unwrap(self.model)
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), model.get_input_embeddings().num_embeddings)
        a, b = torch.randint(vocab, (1, 5), generator=generator), torch.randint(vocab, (1, 7), generator=generator)
        segments = torch.tensor([[0] * 5 + [1] * 7])
        positions = torch.tensor([list(range(5)) + list(range(7))])
        try:
            with torch.no_grad():
                alone = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
                packed = model(
                    input_ids=torch.cat([a, b], 1),
                    attention_mask=packed_attention(segments, torch.float32),
                    position_ids=positions,
                ).logits
            ok = torch.allclose(alone, packed, atol=1e-4, rtol=1e-3)
        except Exception:  # a model that rejects 4-D masks or position_ids
            ok = False
        model.train(was_training)
        if not ok:
            raise SftError(
                f"data.packing: {model.config.model_type} does not support isolated packed examples here — set data.packing: false"
            )

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        total, count = 0.0, 0.0
        for batch in batches:
            summed, n = self.loss_terms(model, {k: v for k, v in batch.items() if not k.startswith("lm_")})["sup"]
            total += float(summed)
            count += float(n)
        totals = gather([(total, count)])
        loss = sum(t for t, _ in totals) / max(sum(n for _, n in totals), 1)
        metrics: dict[str, Any] = {"loss": loss, "perplexity": perplexity(loss)}
        if final:
            predictions = self.generate_all(bb.unwrap(model), gather)
            metrics.update(
                generation_metrics([p["prediction"] for p in predictions], [p["reference"] for p in predictions])
            )
            metrics["num_examples"] = len(predictions)
            metrics["predictions"] = predictions
        return metrics

    def generate_all(self, model: torch.nn.Module, gather: Any) -> list[dict[str, str]]:
        """Greedy (or beam) decoding of every eval prompt, sharded over processes."""
        from accelerate import PartialState

        data, settings = self.recipe.data, self.recipe.eval
        state = PartialState()
        indices = list(range(len(self.eval_raw)))[state.process_index :: state.num_processes]
        tokenizer = self.tokenizer
        results = []
        for start in range(0, len(indices), settings.batch_size):
            chunk = [self.eval_raw[i] for i in indices[start : start + settings.batch_size]]
            prompts = [render_prompt(str(r[data.prompt_field]), data.template, tokenizer) for r in chunk]
            encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-data.max_length :] for p in prompts]
            input_ids = pad_sequences(encoded, tokenizer.pad_token_id, max(len(e) for e in encoded), side="left")
            mask = pad_sequences([[1] * len(e) for e in encoded], 0, input_ids.shape[1], side="left")
            device = next(model.parameters()).device
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                num_beams=settings.num_beams,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, generated in zip(chunk, output[:, input_ids.shape[1] :].tolist()):
                stopped = tokenizer.eos_token_id in generated
                text = tokenizer.decode(generated, skip_special_tokens=True)
                results.append(
                    {
                        "prompt": str(row[data.prompt_field]),
                        "reference": str(row[data.response_field]),
                        "prediction": text.strip(),
                        "stopped": stopped,
                    }
                )
        return gather(results)

    def save(self, model: torch.nn.Module, directory: Path) -> None:
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora)
        self.tokenizer.save_pretrained(directory)

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        predictions = metrics.pop("predictions", [])
        with open(directory / "predictions.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)


class _PackedRows:
    """A list of packed rows that DataLoader can index (each row: lists of examples)."""

    def __init__(self, rows: list[dict[str, list]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, list]:
        return self.rows[index]

    def lengths(self) -> list[int]:
        return [sum(len(e) for e in r["input_ids"]) for r in self.rows]


def _compute_dtype(model: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention scores are computed in (autocast's when active)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype
