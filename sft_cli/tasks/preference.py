"""Preference tuning of a causal LM on chosen/rejected pairs: DPO, IPO, ORPO, SimPO (`loss.preference`).

What makes it cheap:
- one forward per pair: the prompt once, then the chosen and the rejected completion packed after it, each
  seeing the prompt and itself (a shared-prefix mask; positions restart after the prompt), where the model keeps
  them apart exactly — checked at start-up, else the two sides go as two padded rows;
- log-probabilities through the chunked projection (`SequenceScorer`): no `[tokens x vocab]` logits;
- no second model: the reference's log-probabilities are computed once before training and cached with the
  tokenized data (`loss.reference: precompute`), or on the fly with LoRA adapters disabled (`adapters-off`).

Predicting, chatting and exporting are generation's: the model is a chat model like any other.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Iterable, Optional

import torch

from sft_cli.chat.masks import ChatEncoder
from sft_cli.chat.templates import prepare_tokenizer
from sft_cli.data.packing import packed_attention, pad_sequences
from sft_cli.data.tables import fingerprint, require_columns
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.lm_loss import hidden_loss_matches, release_before_embedding_backward
from sft_cli.model.preference_losses import NEEDS_REFERENCE, PairLogps, preference_loss
from sft_cli.model.sequence_logps import SequenceScorer, per_sequence
from sft_cli.tasks.base import Batch, LossTerms, Task
from sft_cli.tasks.generation import GenerationTask
from sft_cli.tasks.generation_infer import set_stop_tokens
from sft_cli.tasks.metrics import generation_metrics
from sft_cli.tasks.preference_data import PairEncoder, encode_pairs, is_conversational
from sft_cli.tasks.text import backbone_tokenizer, ensure_pad_token, load_tokenizer

log = logging.getLogger(__name__)
SHARED, ROWS = "shared-prompt", "rows"  # how a pair is laid out in a batch


class PreferenceTask(GenerationTask):
    """Pairs -> one preference loss per pair (+ `loss.sft_weight` x NLL of the chosen completion)."""

    main_metric = "eval_loss"
    main_mode = "min"
    shardable = True  # evaluations while training only score pairs (every rank the same forwards); `sft eval` decodes
    eval_at_start = True  # the starting reward accuracy and log-probabilities, for the comparison after
    reference_seconds = 0.0  # spent computing the reference's log-probabilities (0 when read from the cache)

    @classmethod
    def variant(cls, recipe: Any) -> type[Task]:
        return cls

    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        recipe, data, spec = self.recipe, self.recipe.data, self.recipe.backbone
        if recipe.loss.lm > 0:
            raise SftError("loss.lm: task preference adds the chosen completion's NLL instead — use loss.sft_weight")
        resolved = bb.resolve(spec) if train else None
        if train and bb.is_encoder_decoder(spec):
            raise SftError("backbone: task preference tunes decoder-only models; this one is encoder-decoder")
        self.tokenizer = backbone_tokenizer(resolved, spec) if train else load_tokenizer(model_dir, spec)
        tables = self._tables(train)
        for key, table in tables.items():
            require_columns(table, [data.chosen_field], "data.chosen_field", key)
            require_columns(table, [data.rejected_field], "data.rejected_field", key)
        sample = next(iter(tables.values()))
        conversational = any(is_conversational(row, data) for row in sample.select(range(min(32, len(sample)))))
        self.chat = None
        if conversational or data.chat_template is not None or data.template == "chat":
            template = prepare_tokenizer(self.tokenizer, data.chat_template, model_dir or spec.name)
            self.chat = ChatEncoder(self.tokenizer, template, "last", data.history)
        ensure_pad_token(self.tokenizer)
        if self.tokenizer.eos_token_id is None:
            raise SftError("backbone: preference tuning needs a tokenizer with an EOS token (completions end with it)")
        self.pairs = PairEncoder(self.tokenizer, data, self.chat)
        model = self._build_model(resolved) if train else bb.load_trained(self.auto_class, model_dir)
        set_stop_tokens(bb.unwrap(model), self.tokenizer)
        self.isolation = None
        if train:
            self.train_set = encode_pairs(
                tables["data.train"], self.pairs, "data.train", data.train, self.skipped, self.data_cache
            )
            model = bb.apply_freeze(model, recipe.freeze, self.new_tokens)
        self.scorer = self.model = SequenceScorer(model, hidden_loss_matches(model, len(self.tokenizer)))
        if self.scorer.chunked:
            release_before_embedding_backward(self.scorer.network())
        self.layout = SHARED if self._shared_prompt_exact() else ROWS
        if "data.eval" in tables:
            self.eval_set = encode_pairs(
                tables["data.eval"], self.pairs, "data.eval", data.eval, self.skipped, self.data_cache
            )
            self.eval_prompts = self._eval_prompts(tables["data.eval"].select(self.eval_set["row"]))
        self._attach_reference(train)

    def uses_reference(self) -> bool:
        """DPO and IPO compare with a reference model; ORPO and SimPO need none."""
        return self.recipe.loss.preference in NEEDS_REFERENCE

    def _eval_prompts(self, table: Any) -> list[dict[str, Any]]:
        """What `sft eval` generates from: each eval pair's prompt, its chosen completion as the reference."""
        prompts = []
        for row, ids in zip(table, self.eval_set["prompt_ids"]):
            prompt, chosen, _ = self.pairs.messages(row)
            show = {"messages": prompt} if self.chat is not None else {"prompt": prompt[0]["content"]}
            prompts.append({"ids": ids, "reference": chosen[0].get("content") or "", "show": show})
        return prompts

    # -- the reference model, without a second copy --------------------------------------------------

    def _attach_reference(self, train: bool) -> None:
        """Precomputed reference log-probabilities on each split (DPO / IPO; `sft eval` always: from the backbone)."""
        if not self.uses_reference() or (train and self.recipe.loss.reference != "precompute") or not self.computes:
            return
        reference = self.scorer if train else self._backbone_scorer()
        if train:
            self.train_set = self._with_reference(self.train_set, "data.train", reference)
        if self.eval_set is not None:
            self.eval_set = self._with_reference(self.eval_set, "data.eval", reference)

    def _backbone_scorer(self) -> SequenceScorer:
        """The model training started from (`sft eval` of a trained run scores rewards against it)."""
        try:
            model = self._build_model(bb.resolve(self.recipe.backbone))
        except SftError as err:
            raise SftError(f"{err} — rewards are measured against the starting model (backbone.name)") from None
        return SequenceScorer(model, hidden_loss_matches(model, len(self.tokenizer)))

    def _with_reference(self, encoded: Any, key: str, scorer: SequenceScorer) -> Any:
        """The split with `ref_logps` (chosen, rejected) from the model as it starts, computed once and cached
        beside the tokenized data (keyed by the data and the weights, so a resumed run reads the same values)."""
        from accelerate import PartialState
        from accelerate.state import AcceleratorState

        device = PartialState().device
        # under the precision training computes in (the engine's autocast), so the policy starts at reward 0
        precision = AcceleratorState().mixed_precision if AcceleratorState._shared_state else "no"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        lm = scorer.lm
        weights = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(lm.state_dict().items()):
            if "lora_" in name:  # LoRA starts as the identity (B = 0): its random A does not change the reference
                continue
            weights.update(name.encode())
            weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        config = scorer.network().config
        key_parts = (
            encoded._fingerprint,
            "reference-v2",
            weights.hexdigest(),
            config.to_json_string(use_diff=False),  # rope, windows: what the weights alone do not say
            config._attn_implementation,
            scorer.chunked,
            device.type,
            precision,
            self.layout,
        )
        home = next(scorer.parameters()).device
        scorer.to(device)
        was_training = scorer.training
        scorer.eval()

        def score(rows: dict[str, list]) -> dict[str, list]:
            pairs = [dict(zip(rows, values)) for values in zip(*rows.values())]
            batch = {k: v.to(device) for k, v in self.collate(pairs, train=False).items()}
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                policy = self._logps(scorer, batch)
            return {"ref_logps": torch.stack([policy.chosen, policy.rejected], 1).cpu().tolist()}

        start = time.perf_counter()
        try:
            return encoded.map(
                score,
                batched=True,
                batch_size=self.recipe.eval.batch_size,
                new_fingerprint=fingerprint(*key_parts),
                desc=f"reference log-probabilities ({key})",
            )
        finally:
            scorer.train(was_training)
            scorer.to(home)
            self.reference_seconds += time.perf_counter() - start

    # -- batches ------------------------------------------------------------------------------------

    def lengths(self, split: str) -> Optional[list[int]]:
        table = self.train_set if split == "train" else self.eval_set
        return table["length"] if table is not None else None

    def _shared_prompt_exact(self) -> bool:
        """Whether this model scores a pair packed after one prompt exactly as two separate rows (checked on a short
        random pair; a sliding attention window, which a long packed row could exceed, means no)."""
        config = self.scorer.network().config.get_text_config()
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            log.info("preference pairs go as two padded rows: this model attends through a sliding window")
            return False
        generator = torch.Generator().manual_seed(0)
        vocab = min(len(self.tokenizer), config.vocab_size)
        pair = {
            name: torch.randint(vocab, (size,), generator=generator).tolist()
            for name, size in (("prompt_ids", 5), ("chosen_ids", 3), ("rejected_ids", 4))
        }
        was_training = self.scorer.training
        self.scorer.eval()
        try:
            with torch.no_grad():
                apart = self._logps(self.scorer, self._collate([pair], ROWS))
                packed = self._logps(self.scorer, self._collate([pair], SHARED))
            exact = torch.allclose(apart.chosen, packed.chosen, atol=1e-4) and torch.allclose(
                apart.rejected, packed.rejected, atol=1e-4
            )
        except Exception as err:  # noqa: BLE001 — a model that refuses 4-D masks or position_ids
            log.debug("shared-prompt layout unavailable: %s", err)
            exact = False
        finally:
            self.scorer.train(was_training)
        if not exact:
            log.info("preference pairs go as two padded rows: this model does not take a shared-prompt mask exactly")
        return exact

    def collate(self, rows: list[dict], train: bool) -> Batch:
        batch = self._collate(rows, self.layout)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.tensor([row["ref_logps"] for row in rows], dtype=torch.float32)
        return batch

    def _collate(self, rows: list[dict], layout: str) -> Batch:
        """Token rows + where each completion token is predicted from (`score_index`, flat over the padded
        batch), its target and its sequence (2i: pair i's chosen side, 2i+1: its rejected side)."""
        sequences, positions, segments, scored = [], [], [], []  # scored: (row, predictor position, target, seq)
        for number, row in enumerate(rows):
            prompt, sides = row["prompt_ids"], (row["chosen_ids"], row["rejected_ids"])
            if layout == SHARED:
                ids, pos, seg = list(prompt), list(range(len(prompt))), [0] * len(prompt)
                for side, completion in enumerate(sides):
                    start = len(ids)
                    for k, token in enumerate(completion):
                        scored.append(
                            (len(sequences), start + k - 1 if k else len(prompt) - 1, token, 2 * number + side)
                        )
                    ids += completion
                    pos += range(len(prompt), len(prompt) + len(completion))
                    seg += [side + 1] * len(completion)
                sequences.append(ids)
                positions.append(pos)
                segments.append(seg)
                continue
            for side, completion in enumerate(sides):
                for k, token in enumerate(completion):
                    scored.append((len(sequences), len(prompt) + k - 1, token, 2 * number + side))
                sequences.append(list(prompt) + list(completion))
                positions.append(list(range(len(sequences[-1]))))
                segments.append([0] * len(sequences[-1]))
        input_ids = pad_sequences(sequences, self.tokenizer.pad_token_id, buckets=self.length_buckets)
        length = input_ids.shape[1]
        where = torch.tensor(scored, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "position_ids": pad_sequences(positions, 0, length),
            "segment_ids": pad_sequences(segments, -1, length),
            "score_index": where[:, 0] * length + where[:, 1],
            "score_targets": where[:, 2],
            "score_sequence": where[:, 3],
            "pair_tokens": torch.tensor([[len(r["chosen_ids"]), len(r["rejected_ids"])] for r in rows]),
        }

    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        counts = {"sup": torch.tensor(batch["pair_tokens"].shape[0])}
        if self.sft_weight() > 0:
            counts["sft"] = batch["pair_tokens"][:, 0].sum()
        return counts

    def tokens(self, batch: Batch) -> int:
        return int((batch["segment_ids"] >= 0).sum())

    # -- loss ---------------------------------------------------------------------------------------

    def sft_weight(self) -> float:
        """loss.sft_weight, or the loss's own default (ORPO's NLL term weighs 1)."""
        weight = self.recipe.loss.sft_weight
        return weight if weight is not None else (1.0 if self.recipe.loss.preference == "orpo" else 0.0)

    def loss_weights(self) -> dict[str, float]:
        return {"sft": self.sft_weight()}

    def _logps(self, model: torch.nn.Module, batch: Batch) -> PairLogps:
        """Summed completion log-probabilities of both sides of every pair in the batch, with their lengths."""
        segments = batch["segment_ids"]
        if int(segments.max()) > 0:  # the shared-prompt layout (segments 1 and 2 are the completions)
            mask = packed_attention(segments, bb.compute_dtype(model, segments.device), 0)
            inputs = {"attention_mask": mask, "position_ids": batch["position_ids"]}
        else:  # two right-padded rows a pair: the plain padding mask
            inputs = {"attention_mask": (segments >= 0).long()}
        per_token = model(batch["input_ids"], batch["score_index"], batch["score_targets"], **inputs)
        pairs = batch["pair_tokens"].shape[0]
        sums = per_sequence(per_token, batch["score_sequence"], 2 * pairs).view(pairs, 2)
        tokens = batch["pair_tokens"]
        return PairLogps(sums[:, 0], sums[:, 1], tokens[:, 0], tokens[:, 1])

    def _reference(self, batch: Batch) -> Optional[PairLogps]:
        if not self.uses_reference():
            return None
        tokens = batch["pair_tokens"]
        if "ref_logps" in batch:
            return PairLogps(batch["ref_logps"][:, 0], batch["ref_logps"][:, 1], tokens[:, 0], tokens[:, 1])
        lm = self.scorer.lm
        if not hasattr(lm, "disable_adapter"):
            raise SftError("loss.reference: adapters-off needs freeze.policy: lora")
        with torch.no_grad(), lm.disable_adapter():
            return self._logps(self.scorer, batch)

    def _pair_losses(self, model: torch.nn.Module, batch: Batch) -> tuple[PairLogps, Any]:
        loss = self.recipe.loss
        policy = self._logps(model, batch)
        losses = preference_loss(
            loss.preference, policy, self._reference(batch), loss.beta, loss.gamma, loss.label_smoothing
        )
        return policy, losses

    def loss_terms(self, model: torch.nn.Module, batch: Batch) -> LossTerms:
        policy, (losses, _, _) = self._pair_losses(model, batch)
        terms = {"sup": (losses.sum(), torch.tensor(losses.shape[0]))}
        if self.sft_weight() > 0:
            terms["sft"] = (-policy.chosen.sum(), policy.chosen_tokens.sum())
        return terms

    # -- evaluation -----------------------------------------------------------------------------------

    def evaluate(
        self, model: torch.nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True
    ) -> dict[str, Any]:
        names = ("loss", "correct", "margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps")
        totals = dict.fromkeys((*names, "nll", "chosen_tokens", "pairs"), 0.0)
        with torch.no_grad():
            for batch in batches:
                policy, (losses, chosen, rejected) = self._pair_losses(model, batch)
                values = (
                    losses,
                    chosen > rejected,
                    chosen - rejected,
                    chosen,
                    rejected,
                    policy.chosen,
                    policy.rejected,
                )
                for name, value in zip(names, values):
                    totals[name] += float(value.float().sum())
                totals["nll"] -= float(policy.chosen.sum())
                totals["chosen_tokens"] += float(policy.chosen_tokens.sum())
                totals["pairs"] += losses.shape[0]
        parts = gather([totals])  # one collective: every process's sums
        summed = {name: sum(part[name] for part in parts) for name in totals}
        pairs = max(summed["pairs"], 1)
        nll = summed["nll"] / max(summed["chosen_tokens"], 1)
        metrics: dict[str, Any] = {
            "loss": self.recipe.loss.supervised * summed["loss"] / pairs + self.sft_weight() * nll,
            "reward_accuracy": summed["correct"] / pairs,
            "reward_margin": summed["margin"] / pairs,
            **{name: summed[name] / pairs for name in names[3:]},
            "chosen_nll": nll,
            "num_examples": int(summed["pairs"]),
        }
        if final:
            predictions = self.generate_all(bb.unwrap(model), gather)
            references = [p["reference"] for p in predictions]
            metrics.update(generation_metrics([p["prediction"] for p in predictions], references))
            metrics["stop_rate"] = sum(p["stopped"] for p in predictions) / max(len(predictions), 1)
            metrics["predictions"] = predictions
        return metrics

    # -- what `sft plan` and summary.json show -------------------------------------------------------

    def plan_statistics(self) -> dict[str, Any]:
        table = self.train_set
        return {
            "pairs": len(table),
            "prompt_tokens": sum(len(ids) for ids in table["prompt_ids"]),
            "completion_tokens": {
                side: sum(len(ids) for ids in table[f"{side}_ids"]) for side in ("chosen", "rejected")
            },
            "reference": self.reference_mode(),
            "layout": self.layout,
        }

    def reference_mode(self) -> str:
        """Where the reference log-probabilities come from (none for ORPO / SimPO)."""
        return self.recipe.loss.reference if self.uses_reference() else "none"

    def render(self, row: dict) -> Optional[str]:
        decode = self.tokenizer.decode
        return (
            f"{decode(row['prompt_ids'])}\n  [chosen, scored] {decode(row['chosen_ids'])}\n"
            f"  [rejected, scored] {decode(row['rejected_ids'])}"
        )

    def summary_extras(self) -> dict[str, Any]:
        return {
            "preference": {
                "loss": self.recipe.loss.preference,
                "reference": self.reference_mode(),
                "layout": self.layout,
                "sft_weight": self.sft_weight(),
                "reference_seconds": round(self.reference_seconds, 3),
            }
        }
