"""What sft knows about each task beyond its code: the command that runs it, the metric people compare runs by,
its model-card pipeline tag and text, its starter recipe, and whether `sft chat` talks to it.

One entry per task; `sft_cli.tasks.registry.TASKS` maps the same names to their classes and `schema.TASKS`
lists them (a test keeps the three equal). Plain data, so `sft runs` and `sft init` read it without loading
any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """The facts about one task that commands need."""

    command: str  # finetune | pretrain
    headline_metric: str  # what `sft runs` compares runs by (an eval.json key)
    pipeline_tag: str  # the model card's Hugging Face pipeline tag
    card_use: str  # the model card's one-line "what it does"
    starter: dict[str, Any] = field(default_factory=dict)  # `sft init`: what the starter recipe sets
    can_chat: bool = False  # `sft chat` talks to its models
    also_runs_with: tuple[str, ...] = ()  # other training commands it takes (image generation: pretrain too)


STARTERS = {
    "classification": {
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "text_field": "text", "label_field": "label"},
    },
    "regression": {
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "text_field": "text", "label_field": "score"},
        "loss": {"regression": "mse"},
    },
    "multi-label-classification": {
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "text_field": "text", "label_field": "tags"},
        "eval": {"tune_threshold": True},
    },
    "token-classification": {
        "data": {"train": "data/train.conll", "eval": "data/test.conll", "max_length": 128, "stride": 32},
    },
    "question-answering": {
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "max_length": 384, "stride": 128},
        "eval": {"tune_threshold": True},
    },
    "image-classification": {
        "backbone": {"name": "path/to/vision-model", "arch": "resnet", "from_scratch": False},
        "data": {
            "train": "data/images/train",
            "eval": "data/images/test",
            "image_size": 224,
            "augment": {"random_crop_padding": 4, "horizontal_flip": True},
        },
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    },
    "generation": {
        "backbone": {"name": "runs/tiny-gpt-pretrain/model"},
        "data": {"train": "data/train.jsonl", "eval": "data/test.jsonl", "template": "{prompt} =>", "packing": True},
    },
    "language-modeling": {
        "objective": "clm",
        "backbone": {"arch": "gpt2", "from_scratch": True, "config": {"n_layer": 4, "n_embd": 256, "n_head": 4}},
        "tokenizer": {"train": True, "vocab_size": 8000},
        "data": {"train": "data/corpus.txt", "eval": "data/corpus-eval.txt", "max_length": 128},
    },
    "speech-recognition": {
        "backbone": {
            "arch": "wav2vec2",
            "from_scratch": True,
            "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
        },
        "data": {"train": "data/speech/train.jsonl", "eval": "data/speech/test.jsonl", "audio_field": "audio"},
        "optim": {"lr": 0.0005},
    },
    "image-generation": {
        "backbone": {"name": "runs/diffusion-pretrain/model"},
        "data": {"train": "data/images/train", "eval": "data/images/test", "image_size": 32},
        "optim": {"lr": 0.0002},
        "engine": {"ema": True},
        "eval": {"feature_model": "runs/image-classifier/model", "guidance_scale": 2.0},
    },
    "preference": {
        "backbone": {"name": "runs/chat-sft/model"},
        "data": {"train": "data/prefs/train.jsonl", "eval": "data/prefs/test.jsonl", "max_length": 512},
        "loss": {"preference": "dpo", "beta": 0.1},
        "optim": {"lr": 5.0e-6},
        "schedule": {"epochs": 1, "batch_size": 8},
    },
}

TASK_SPECS: dict[str, TaskSpec] = {
    "classification": TaskSpec(
        command="finetune",
        headline_metric="accuracy",
        pipeline_tag="text-classification",
        card_use="Labels short texts like those in the training data with one of the labels below.",
        starter=STARTERS["classification"],
    ),
    "regression": TaskSpec(
        command="finetune",
        headline_metric="rmse",
        pipeline_tag="text-classification",
        card_use="Predicts the numeric target(s) below, in the training data's units, for texts like the training data.",
        starter=STARTERS["regression"],
    ),
    "multi-label-classification": TaskSpec(
        command="finetune",
        headline_metric="micro_f1",
        pipeline_tag="text-classification",
        card_use="Tags short texts like those in the training data with any number of the labels below.",
        starter=STARTERS["multi-label-classification"],
    ),
    "token-classification": TaskSpec(
        command="finetune",
        headline_metric="f1",
        pipeline_tag="token-classification",
        card_use="Tags each word of sentences like those in the training data with one of the tags below (entities).",
        starter=STARTERS["token-classification"],
    ),
    "question-answering": TaskSpec(
        command="finetune",
        headline_metric="f1",
        pipeline_tag="question-answering",
        card_use='Answers questions with a span of the given context (or "" when the context holds no answer).',
        starter=STARTERS["question-answering"],
    ),
    "image-classification": TaskSpec(
        command="finetune",
        headline_metric="accuracy",
        pipeline_tag="image-classification",
        card_use="Labels images like those in the training data with one of the labels below.",
        starter=STARTERS["image-classification"],
    ),
    "generation": TaskSpec(
        command="finetune",
        headline_metric="loss",
        pipeline_tag="text-generation",
        card_use="Answers prompts or continues conversations in the style of the training data.",
        starter=STARTERS["generation"],
        can_chat=True,
    ),
    "language-modeling": TaskSpec(
        command="pretrain",
        headline_metric="perplexity",
        pipeline_tag="text-generation",
        card_use="Scores or continues text like the training corpus.",
        starter=STARTERS["language-modeling"],
    ),
    "speech-recognition": TaskSpec(
        command="finetune",
        headline_metric="wer",
        pipeline_tag="automatic-speech-recognition",
        card_use="Transcribes speech like the training recordings (language, voices, vocabulary) into text.",
        starter=STARTERS["speech-recognition"],
    ),
    "image-generation": TaskSpec(
        command="finetune",
        headline_metric="fid",
        pipeline_tag="unconditional-image-generation",
        card_use="Draws images like the training images (of the classes or captions below, when conditional).",
        starter=STARTERS["image-generation"],
        also_runs_with=("pretrain",),
    ),
    "preference": TaskSpec(
        command="finetune",
        headline_metric="reward_accuracy",
        pipeline_tag="text-generation",
        card_use="Answers prompts or continues conversations, tuned towards the preferred replies of its pairs.",
        starter=STARTERS["preference"],
        can_chat=True,
    ),
}
