"""The small interface every task implements; the engine only ever talks to this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import nn

from sft_cli.config.schema import Recipe
from sft_cli.data.mixture import Mixture, source_data, sources
from sft_cli.data.tables import DataCache, SkipCounter
from sft_cli.errors import SftError

Batch = dict[str, torch.Tensor]
# A loss term as (sum over the items of this micro-batch, number of items): the engine divides by the
# item count of the whole accumulation window, so accumulation never changes the loss.
LossTerms = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Task(ABC):
    """Builds a model and its data for one kind of problem, and knows its loss and metrics."""

    #: metric that selects the best model when the recipe does not name one, and its direction
    main_metric: str = "eval_loss"
    main_mode: str = "min"
    #: eval metrics (same direction as the main one), compared in order between evaluations whose main metrics are
    #: equal (without early stopping)
    tie_breakers: tuple[str, ...] = ()
    #: the class that reloads `model/` (for users and tests)
    auto_class: Any = None
    #: evaluate once before the first step (e.g. the untrained perplexity)
    eval_at_start: bool = False
    #: length-grouped batches unless the recipe says otherwise: measured per task in benchmarks/GROUPING.md
    #: (classification: 2.4x tokens/s, quality within noise; generation: eval loss 2.59 grouped vs 1.96)
    group_by_length: bool = False
    #: tokens in every training example when fixed (packed pretraining blocks): lets schedule.max_tokens size the run
    tokens_per_example: Optional[int] = None
    #: the training data is a stream (data.streaming): `train_stream` replaces `train_set`
    streaming: bool = False
    #: its evaluation runs under FSDP2 sharding (every rank the same forward passes; no free-running decoding)
    shardable: bool = True
    #: `lengths` are tokens cut at data.max_length (`sft plan` counts truncated examples); False when they are not
    #: (speech: audio samples, and long clips are skipped, never cut)
    truncates: bool = True
    #: pad batches to power-of-two lengths: set by the engine while it trains a compiled model (engine.compile),
    #: so its graphs are reused, not rebuilt for every length
    length_buckets: bool = False

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.command = "finetune"  # the command training it (pretrain | finetune): the training command sets it
        self.prediction_output: Optional[Path] = None  # `sft predict`'s output file (tasks that write files beside it)
        self.model: nn.Module
        self.train_set: Any = None
        self.eval_set: Any = None
        self.skipped = SkipCounter()  # rows left out of each split, by reason
        self.data_cache = DataCache()  # where parsed and tokenized data goes: the command sets it (tokenize once)
        self.computes = True  # setup may run the model over the data (a reference pass); False: plan, prepare
        self.mixture: Optional[Mixture] = None  # data.train as a list of sources: which rows each epoch draws

    @classmethod
    def variant(cls, recipe: Recipe) -> type[Task]:
        """The class that runs this recipe: this one, or a sibling for another kind of backbone (generation on an
        encoder-decoder)."""
        return cls

    @abstractmethod
    def setup(self, model_dir: Optional[str] = None, train: bool = True) -> None:
        """Load data and build `self.model` (from `model_dir` when evaluating a trained model)."""

    def groups_by_length(self, requested: Optional[bool]) -> bool:
        """The recipe's `schedule.group_by_length`, or this task's measured default when it is null."""
        return self.group_by_length if requested is None else requested

    def lengths(self, split: str) -> Optional[list[int]]:
        """Example lengths used for length-grouped batching (None: no grouping)."""
        return None

    def train_locations(self) -> list[tuple[str, Any, Any]]:
        """(recipe key, location, data keys) of each training source: data.train, or each source of a mixture."""
        data = self.recipe.data
        mix = sources(data)
        if mix is None:
            return [("data.train", data.train, data)]
        return [(s.key, s.path, source_data(data, s)) for s in mix]

    def mix_sources(self, parts: list[Any]) -> Any:
        """The training table of all sources (a mixture remembers each one's rows), or the one source's."""
        mix = sources(self.recipe.data)
        if mix is None:
            return parts[0]
        import datasets

        self.mixture = Mixture(mix, [len(p) for p in parts], self.recipe.engine.seed)
        return datasets.concatenate_datasets(parts)

    @contextmanager
    def reading(self, data: Any) -> Iterator[None]:
        """Inside, `self.recipe.data` is one mixture source's data keys (for code that reads them from the recipe)."""
        recipe = self.recipe
        self.recipe = replace(recipe, data=data)
        try:
            yield
        finally:
            self.recipe = recipe

    @property
    def name(self) -> str:
        """The recipe's `task` (for messages)."""
        return self.recipe.task

    def train_stream(self, rank: int, world: int, batch_size: int, skip_batches: int) -> Any:
        """This rank's endless stream of collated training batches, after `skip_batches` (data.streaming)."""
        raise SftError(f"data.streaming: not supported by task {self.recipe.task}")

    @abstractmethod
    def collate(self, rows: list[dict], train: bool) -> Batch:
        """Turn dataset rows into a batch of CPU tensors."""

    @abstractmethod
    def counts(self, batch: Batch) -> dict[str, torch.Tensor]:
        """How many loss items each term has in this batch (known before the forward pass)."""

    @abstractmethod
    def loss_terms(self, model: nn.Module, batch: Batch) -> LossTerms:
        """Summed losses per term (`sup`, optionally `lm`) for one micro-batch."""

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name part (parameters the task adds at zero); none by default."""
        return {}

    def loss_weights(self) -> dict[str, float]:
        """Fixed weights that override the recipe's loss mix (e.g. pretraining's LM term is the loss)."""
        return {}

    def plan_statistics(self) -> dict[str, Any]:
        """Facts about the training labels that `sft plan` shows (label counts, target mean/std, entity types)."""
        return {}

    def render(self, row: dict) -> Optional[str]:
        """How `sft plan` shows a training row, when the task shows it its own way (None: decoded tokens)."""
        return None

    def describe_target(self, row: dict) -> str:
        """How `sft plan` shows a tokenized training row's target, after its decoded tokens."""
        return ""

    def summary_extras(self) -> dict[str, Any]:
        """Task-specific facts for summary.json (e.g. trained tokens per role); nothing by default."""
        return {}

    def tokens(self, batch: Batch) -> int:
        """Non-padding tokens in a batch (for throughput)."""
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(next(iter(batch.values())).shape[0])

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], gather: Any, final: bool = True) -> dict[str, Any]:
        """Metrics on held-out batches; `gather` collects lists across processes.

        `final` is False for evaluations during training, where slow metrics (generation) may be skipped.
        """

    @abstractmethod
    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        """Write a `from_pretrained`-loadable model (+ tokenizer/processor) into `directory`; `state_dict` is the
        full weights the engine gathered when the model is sharded (FSDP, ZeRO-3), else None."""

    def write_eval_artifacts(self, run_dir: Path, step: int) -> None:
        """Files an evaluation during training leaves in the run directory (image samples); nothing by default."""

    def export(self, model: nn.Module, directory: Path) -> bool:
        """Write `sft export`'s directory in the task's own format; False: the standard transformers layout."""
        return False

    def report(self, metrics: dict[str, Any], directory: Path) -> None:
        """Extra artefacts after `sft eval` (plots); nothing by default."""

    # -- using a trained model (`sft predict`, `sft chat`) ----------------------------------------------

    def load_for_inference(self, model_dir: str) -> None:
        """Tokenizer (or image preprocessing) and model from a trained model directory, without any data."""
        raise SftError(f"task: {self.recipe.task} models cannot predict")

    def prediction_table(self, location: str) -> Any:
        """The rows `sft predict` reads, loaded like training data (labels are not needed)."""
        from sft_cli.data.tables import load_table

        return load_table(location, "--input", self.data_cache)

    def check_input(self, columns: list[str]) -> None:
        """Fail, naming the recipe key, when the input lacks a column the task needs."""

    def row_problems(self, rows: list[dict], first: int) -> list[Optional[str]]:
        """Per row, None or why it is skipped (a null text); a row training would refuse is an error naming its
        (1-based) row number (`first` numbers rows[0]), or with `data.skip_invalid` skipped too."""
        return [None] * len(rows)

    def predict_length(self, row: dict) -> int:
        """A cheap size of a row, to batch similar rows together (0: no sorting)."""
        return 0

    def predict(self, model: nn.Module, rows: list[dict], settings: Any) -> list[dict[str, Any]]:
        """The prediction fields for each row (`prediction` and the task's extras), in the rows' order."""
        raise SftError(f"task: {self.recipe.task} models cannot predict")
