"""Extractive question answering (SQuAD v1 / v2) on a span head: the answer is a span of the context.

A context longer than `data.max_length` (with its question) becomes overlapping windows (`data.stride` tokens
shared). Training labels each window with the answer's first and last token, or with the [CLS] position when the
answer is not wholly inside it (and for unanswerable questions). The answer is the best-scoring span over all
windows (start + end logits, at most `eval.max_answer_length` tokens, from the `eval.n_best` best starts and ends);
for v2 it is "" when the no-answer score beats it by more than `eval.null_threshold` (tuned on eval with
`eval.tune_threshold`, saved in the model's config as `sft_null_threshold`) — as Hugging Face's run_qa.py does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForQuestionAnswering

from sft_cli.data.packing import pad_sequences
from sft_cli.data.tables import cached_map, drop_null_rows, load_table, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.lm_aux import AuxiliaryLM, aux_counts, aux_terms
from sft_cli.tasks.metrics import best_null_threshold, squad_metrics
from sft_cli.tasks.text import (
    TextFieldInput,
    load_tokenizer,
    new_text_model,
    require_fast_tokenizer,
    text_batch,
    tokenizer_fingerprint,
)

NO_SPAN = (-1, -1)  # offsets of a token outside the context


class QuestionAnsweringTask(TextFieldInput, Task):
    """Span extraction with SQuAD exact match / F1 (and v2's has-answer F1 and no-answer accuracy)."""

    main_metric = "eval_f1"  # SQuAD F1 picks the best model and is what `sft sweep` optimizes
    main_mode = "max"
    auto_class = AutoModelForQuestionAnswering
    # not grouped by length: a long passage's windows are all full length and mostly hold no answer, so grouped
    # batches are all-"no answer" or all-answer and the model learns to say "" (stdlib-qa, 3 epochs, 3e-4: eval
    # F1 0.335 grouped; ungrouped 0.732 after 2 epochs, the Trainer 0.828 after 3 — measured)
    group_by_length = False

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        data = self.recipe.data
        self.null_threshold = self.recipe.eval.null_threshold
        if train:
            raw_train = self.read_split(data.train, "data.train")
            self.tokenizer, self.model = new_text_model(self.recipe, self.auto_class)
        else:
            self.load_for_inference(model_dir)
        require_fast_tokenizer(self.tokenizer, "question answering", "character offsets per token")
        self.aux = AuxiliaryLM.maybe(self.recipe, self.model, self.tokenizer, self.data_cache) if train else None
        if train:
            self.model = bb.apply_freeze(self.model, self.recipe.freeze)
            self.train_set = self.windows(raw_train, "data.train")
            self.train_questions = len(raw_train)
            self.train_unanswerable = sum(not a["text"] for a in raw_train[data.answers_field])
            # SQuAD v1 data (every question answered) never predicts "no answer", as run_qa.py without v2
            self.allow_no_answer = self.train_unanswerable > 0
        if self.aux is not None:
            self.model = self.aux.attach(self.model)
        if data.eval:
            raw_eval = self.read_split(data.eval, "data.eval")
            self.eval_answers = [list(a["text"]) for a in raw_eval[data.answers_field]]
            self.eval_contexts = list(raw_eval[data.context_field])
            self.eval_set = self.windows(raw_eval, "data.eval")

    # -- data ---------------------------------------------------------------------------------------

    def input_fields(self) -> list[tuple[str, str]]:
        data = self.recipe.data
        return [(data.question_field, "data.question_field"), (data.context_field, "data.context_field")]

    def read_split(self, location: Any, key: str) -> Any:
        """A split's questions: answers checked row by row (naming file and row), null rows counted."""
        data = self.recipe.data
        table = load_table(location, key, self.data_cache)
        for field, what in self.input_fields() + [(data.answers_field, "data.answers_field")]:
            require_columns(table, [field], what, f"{key} ({location})")
        bad = []
        for index, (context, answers) in enumerate(zip(table[data.context_field], table[data.answers_field])):
            problem = None if context is None or answers is None else self.answer_problem(context, answers)
            if problem and not data.skip_invalid:
                raise SftError(f"{key} ({location}): row {index + 1}: {problem}")
            if problem:
                bad.append(index)
        if bad:
            self.skipped.add(key, "invalid answer", len(bad))
            table = table.select(sorted(set(range(len(table))) - set(bad)))
        fields = [data.question_field, data.context_field, data.answers_field]
        texts = [data.question_field, data.context_field]
        return drop_null_rows(table, fields, key, self.skipped, texts, data.skip_invalid)

    def answer_problem(self, context: Any, answers: Any) -> Optional[str]:
        """Why a row's answers cannot train (and what to do), or None."""
        field = self.recipe.data.answers_field
        if not isinstance(answers, dict) or not {"text", "answer_start"} <= set(answers):
            return f"'{field}' must be {{text: [...], answer_start: [...]}} (empty lists: unanswerable)"
        texts, starts = answers["text"] or [], answers["answer_start"] or []
        if len(texts) != len(starts):
            return f"'{field}' has {len(texts)} text(s) but {len(starts)} answer_start(s) — give one start per text"
        for text, start in zip(texts, starts):
            if not isinstance(start, int) or not isinstance(text, str) or not isinstance(context, str):
                return f"'{field}': answer_start must be a whole number and text a string"
            if context[start : start + len(text)] != text:
                found = context.find(text)
                hint = f" (the text occurs at {found})" if found >= 0 else " (the text is not in the context)"
                return f"'{field}': answer_start {start} does not point at its text {text!r}{hint}"
        return None

    def window_overlap(self, question_tokens: int) -> int:
        """`data.stride`, capped at half the context room beside this question so windows always advance."""
        max_length = self.recipe.data.max_length
        room = max_length - question_tokens - self.tokenizer.num_special_tokens_to_add(pair=True)
        if room < 8:
            raise SftError(
                f"data.max_length: {max_length} leaves {max(room, 0)} token(s) of context beside a "
                f"{question_tokens}-token question — raise data.max_length"
            )
        return min(self.recipe.data.stride, room // 2)

    def encode_one(self, question: str, context: str) -> Any:
        """The windows of one question over its context (question first, context truncated and strided)."""
        question = question.lstrip()  # as run_qa.py: leading spaces waste room in the window
        question_tokens = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        return self.tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=self.recipe.data.max_length,
            stride=self.window_overlap(question_tokens),
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    def encode(self, rows: dict[str, list], indices: list[int]) -> dict[str, list]:
        """Windows with their answer positions (the [CLS] position when the answer is not wholly inside) and,
        per token, its character span in the context (NO_SPAN outside it)."""
        data = self.recipe.data
        out: dict[str, list] = {key: [] for key in ("input_ids", "start", "end", "offsets", "example", "length")}
        if "token_type_ids" in self.tokenizer.model_input_names:
            out["token_type_ids"] = []
        answers_column = rows.get(data.answers_field) or [None] * len(indices)
        for question, context, answers, index in zip(
            rows[data.question_field], rows[data.context_field], answers_column, indices
        ):
            encoded = self.encode_one(str(question), str(context))
            for window in range(len(encoded["input_ids"])):
                sequence = encoded.sequence_ids(window)
                offsets = [tuple(o) if s == 1 else NO_SPAN for o, s in zip(encoded["offset_mapping"][window], sequence)]
                start, end = self.answer_positions(offsets, answers)
                out["input_ids"].append(encoded["input_ids"][window])
                if "token_type_ids" in out:
                    out["token_type_ids"].append(encoded["token_type_ids"][window])
                out["start"].append(start)
                out["end"].append(end)
                out["offsets"].append(offsets)
                out["example"].append(index)
                out["length"].append(len(encoded["input_ids"][window]))
        return out

    def answer_positions(self, offsets: list[tuple[int, int]], answers: Optional[dict]) -> tuple[int, int]:
        """The first answer's first and last token in this window, or (0, 0) — [CLS] — when it is not all here."""
        if not answers or not answers["text"]:
            return 0, 0
        first, last = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
        inside = [i for i, (s, e) in enumerate(offsets) if (s, e) != NO_SPAN]
        if not inside or offsets[inside[0]][0] > first or offsets[inside[-1]][1] < last:
            return 0, 0
        start = next(i for i in inside if offsets[i][1] > first)
        end = next(i for i in reversed(inside) if offsets[i][0] < last)
        return start, end

    def windows(self, table: Any, key: str) -> Any:
        data = self.recipe.data
        cache_key = (
            "question-answering",
            data.question_field,
            data.context_field,
            data.answers_field,
            data.max_length,
            data.stride,
            tokenizer_fingerprint(self.tokenizer),
        )
        return cached_map(table, self.encode, str(cache_key), with_indices=True, cache=self.data_cache)

    def plan_statistics(self) -> dict[str, Any]:
        examples = np.asarray(self.train_set["example"])
        answered = np.asarray(self.train_set["start"]) > 0
        found = set(examples[answered].tolist())
        answerable = self.train_questions - self.train_unanswerable
        return {
            "answers": {
                "questions": self.train_questions,
                "unanswerable": self.train_unanswerable,
                "windows": len(examples),
                "questions_split_into_windows": int((np.bincount(examples) > 1).sum()),
                "answers_cut_by_every_window": answerable - len(found),
            }
        }

    def describe_target(self, row: dict) -> str:
        if row["start"] == 0:
            return "  -> no answer in this window"
        return f"  -> answer tokens {row['start']}..{row['end']}"

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = text_batch(rows, self.tokenizer.pad_token_id or 0, self.length_buckets)
        batch["start_positions"] = torch.tensor([r["start"] for r in rows])
        batch["end_positions"] = torch.tensor([r["end"] for r in rows])
        if not train:
            batch.update(self.span_tensors(rows, batch["input_ids"].shape[1]))
        if train and self.aux is not None:
            batch.update(self.aux.make_inputs(batch, self.length_buckets))
        return batch

    @staticmethod
    def span_tensors(rows: list[dict], width: int) -> Batch:
        """Per-token character spans (-1 outside the context) and the question each window belongs to."""
        starts = pad_sequences([[s for s, _ in r["offsets"]] for r in rows], -1, width)
        ends = pad_sequences([[e for _, e in r["offsets"]] for r in rows], -1, width)
        return {"char_start": starts, "char_end": ends, "example": torch.tensor([r["example"] for r in rows])}

    # -- loss and answers ---------------------------------------------------------------------------

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"sup": torch.tensor(batch["input_ids"].shape[0]), **aux_counts(batch)}

    def span_logits(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        segments = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments)
        mask = batch["attention_mask"] == 0
        return out.start_logits.float().masked_fill(mask, -1e4), out.end_logits.float().masked_fill(mask, -1e4)

    @staticmethod
    def summed_span_loss(start: torch.Tensor, end: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(start CE + end CE) / 2 per window, summed — the loss of transformers' QA heads."""
        start_loss = F.cross_entropy(start, batch["start_positions"], reduction="sum")
        return (start_loss + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        start, end = self.span_logits(model, batch)
        terms = {"sup": (self.summed_span_loss(start, end, batch), torch.tensor(start.shape[0]))}
        return {**terms, **aux_terms(self.aux, model, batch)}

    def window_candidates(self, start: torch.Tensor, end: torch.Tensor, batch: Batch) -> list[tuple]:
        """Per window: (question, null score, best span score, char start, char end, span probability)."""
        n_best, longest = self.recipe.eval.n_best, self.recipe.eval.max_answer_length
        char_start, char_end = batch["char_start"].tolist(), batch["char_end"].tolist()
        start_log, end_log = start.log_softmax(-1), end.log_softmax(-1)
        out = []
        for row, example in enumerate(batch["example"].tolist()):
            s_logits, e_logits = start[row].tolist(), end[row].tolist()
            best = (-float("inf"), -1, -1, 0.0)
            starts = torch.topk(start[row], min(n_best, start.shape[1])).indices.tolist()
            ends = torch.topk(end[row], min(n_best, end.shape[1])).indices.tolist()
            for i in starts:
                for j in ends:
                    if char_start[row][i] < 0 or char_end[row][j] < 0 or j < i or j - i + 1 > longest:
                        continue
                    score = s_logits[i] + e_logits[j]
                    if score > best[0]:
                        probability = float((start_log[row, i] + end_log[row, j]).exp())
                        best = (score, char_start[row][i], char_end[row][j], probability)
            out.append((example, s_logits[0] + e_logits[0], *best))
        return out

    def answers(self, candidates: list[tuple], contexts: list[str]) -> tuple[list[dict[str, Any]], list[float]]:
        """Per question: the best span over its windows; and how far the no-answer score beats it (its lowest over
        the windows, as run_qa.py), which `null_threshold` is compared with."""
        null = [float("inf")] * len(contexts)
        best: list[tuple] = [(-float("inf"), -1, -1, 0.0)] * len(contexts)
        for example, null_score, score, first, last, probability in candidates:
            null[example] = min(null[example], null_score)
            if score > best[example][0]:
                best[example] = (score, first, last, probability)
        found, margins = [], []
        for example, (score, first, last, probability) in enumerate(best):
            has_span = first >= 0
            found.append(
                {
                    "text": contexts[example][first:last] if has_span else "",
                    "start": first if has_span else -1,
                    "score": round(probability, 6),
                }
            )
            margins.append(null[example] - score if has_span else float("inf"))
        return found, margins

    def decide(self, found: list[dict[str, Any]], margins: list[float], threshold: float) -> list[dict[str, Any]]:
        """No answer ("") where the no-answer score beats the best span by more than `threshold` (v2 data only)."""
        if not self.allow_no_answer:
            return found
        return [
            f if margin <= threshold else {"text": "", "start": -1, "score": f["score"]}
            for f, margin in zip(found, margins)
        ]

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        candidates, loss_sum, windows = [], 0.0, 0
        for batch in batches:
            start, end = self.span_logits(model, batch)
            loss_sum += float(self.summed_span_loss(start, end, batch))
            windows += start.shape[0]
            candidates += self.window_candidates(start, end, batch)
        candidates, losses, counts = gather(candidates), gather([loss_sum]), gather([windows])
        found, margins = self.answers([tuple(c) for c in candidates], self.eval_contexts)
        if self.recipe.eval.tune_threshold and self.allow_no_answer and getattr(self, "tuning", True):
            self.null_threshold = best_null_threshold(
                found, margins, self.eval_answers, self.recipe.eval.null_threshold
            )
        predictions = [f["text"] for f in self.decide(found, margins, self.null_threshold)]
        metrics = squad_metrics(predictions, self.eval_answers)
        return {"loss": sum(losses) / max(sum(counts), 1), **metrics, "null_threshold": self.null_threshold}

    # -- model files and sft predict ----------------------------------------------------------------

    def save(self, model: torch.nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model = getattr(model, "main", model)
        bb.unwrap(model).config.sft_null_threshold = float(self.null_threshold)
        bb.unwrap(model).config.sft_allow_no_answer = self.allow_no_answer
        bb.save_pretrained(model, directory, self.recipe.output.merge_lora, state_dict)
        self.tokenizer.save_pretrained(directory)

    def load_for_inference(self, model_dir: str) -> None:
        self.tokenizer = load_tokenizer(model_dir, self.recipe.backbone)
        self.model = bb.load_trained(self.auto_class, model_dir)
        saved = getattr(self.model.config, "sft_null_threshold", None)
        self.saved_threshold = saved if saved is not None else self.recipe.eval.null_threshold
        # a tuned threshold comes with the model; an untuned recipe evaluates at its own eval.null_threshold
        self.null_threshold = (
            self.saved_threshold if self.recipe.eval.tune_threshold else self.recipe.eval.null_threshold
        )
        self.allow_no_answer = bool(getattr(self.model.config, "sft_allow_no_answer", True))
        self.tuning = False

    def predict(self, model: torch.nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        data = self.recipe.data
        columns = {field: [r.get(field) for r in rows] for field in (data.question_field, data.context_field)}
        encoded = self.encode(columns, list(range(len(rows))))
        windows = [dict(zip(encoded, values)) for values in zip(*encoded.values())]
        device = next(model.parameters()).device
        candidates = []
        for begin in range(0, len(windows), settings.batch_size):
            chunk = windows[begin : begin + settings.batch_size]
            batch = text_batch(chunk, self.tokenizer.pad_token_id or 0)
            batch.update(self.span_tensors(chunk, batch["input_ids"].shape[1]))
            start, end = self.span_logits(model, {k: v.to(device) for k, v in batch.items()})
            candidates += self.window_candidates(start.cpu(), end.cpu(), batch)
        contexts = [str(c) for c in columns[data.context_field]]
        found, margins = self.answers(candidates, contexts)
        return [
            {"prediction": f["text"], "start": f["start"], "score": f["score"]}
            for f in self.decide(found, margins, self.saved_threshold)
        ]
