"""The recipe schema: typed dataclasses, the only home of every default.

Loading, key checks and interpolation live in `recipe.py`; range and cross-field checks in `validation.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

TASKS = (
    "classification",
    "regression",
    "multi-label-classification",
    "token-classification",
    "question-answering",
    "image-classification",
    "generation",
    "language-modeling",
    "speech-recognition",
    "image-generation",
    "preference",
)
PREFERENCE_LOSSES = ("dpo", "ipo", "orpo", "simpo")  # preference: loss.preference
REFERENCE_MODES = ("precompute", "adapters-off")  # preference: where DPO / IPO's reference log-probabilities come from
PREDICTIONS = ("epsilon", "v_prediction")  # image-generation: what the denoiser predicts
NOISE_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # image-generation: the scheduler's beta schedule
SAMPLERS = ("ddim", "dpm-solver", "ddpm")  # image-generation: eval.sampler
FREEZE_POLICIES = ("none", "head-only", "last-n", "patterns", "lora")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("constant", "linear", "cosine", "step", "plateau")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
OBJECTIVES = ("auto", "clm", "mlm", "span", "denoise")
STRATEGIES = ("ddp", "fsdp", "deepspeed")
# output.report_to: Accelerate's built-in trackers (its LoggerType values)
TRACKERS = ("tensorboard", "mlflow", "wandb", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
# output.tracker.<name> options sft checks by name: Accelerate's MLflowTracker and wandb.init's arguments,
# SummaryWriter's (tests/unit/test_recipe.py keeps these equal to the installed libraries')
TRACKER_OPTIONS = {
    "mlflow": (
        "tracking_uri",
        "experiment_name",
        "logging_dir",
        "run_id",
        "tags",
        "nested_run",
        "run_name",
        "description",
    ),
    "wandb": (
        "entity",
        "project",
        "dir",
        "id",
        "name",
        "notes",
        "tags",
        "config",
        "config_exclude_keys",
        "config_include_keys",
        "allow_val_change",
        "group",
        "job_type",
        "mode",
        "force",
        "reinit",
        "resume",
        "resume_from",
        "fork_from",
        "save_code",
        "tensorboard",
        "sync_tensorboard",
        "monitor_gym",
        "settings",
        "anonymous",
    ),  # fmt: skip
    "tensorboard": ("logging_dir", "comment", "purge_step", "max_queue", "flush_secs", "filename_suffix"),
}


# data.train as a mixture: a list of sources {path, weight | num_samples, <data.* keys for this source>}; these
# data keys stay recipe-wide (one chat template, one cache, one length, one stream setting for the whole mix)
MIXTURE_KEYS = ("path", "weight", "num_samples")
MIXTURE_GLOBAL_KEYS = (
    "train",
    "eval",
    "unlabeled",
    "cache_dir",
    "num_proc",
    "streaming",
    "shuffle_buffer",
    "chat_template",
    "history",
    "packing",
    "max_length",
    "max_target_length",
    "source_lang",
    "target_lang",
    "image_size",
    "mean",
    "std",
    "augment",
)
MIXTURE_TASKS = ("generation", "language-modeling")

# The allowed values of data.format, loss.train_on and data.history (validation checks them).
FORMATS = ("auto", "prompt-response", "messages", "sharegpt", "alpaca", "translation")
TRAIN_ON = ("assistant", "last", "all")
HISTORY = ("auto", "whole", "per-turn")
REGRESSION_LOSSES = ("mse", "huber", "l1")


@dataclass
class BackboneConfig:
    """Which model to start from."""

    name: str = "minilm-l6"  # an alias of an embedded model, a local directory, or a hub id
    arch: Optional[str] = None  # a transformers model type (gpt2, llama, bert, resnet, ...)
    from_scratch: bool = False  # fresh random weights from the named (or `arch`) config
    config: dict[str, Any] = field(default_factory=dict)  # overrides applied to the model config
    trust_remote_code: bool = False
    text_encoder: str = "minilm-l6"  # image-generation: the frozen text encoder of a text-conditional UNet


@dataclass
class TokenizerConfig:
    """Train a tokenizer on the training text (byte-level BPE) instead of the backbone's."""

    train: bool = False
    vocab_size: int = 8000


@dataclass
class AugmentConfig:
    """On-the-fly training augmentation for images; never applied at eval."""

    random_crop_padding: int = 0
    horizontal_flip: bool = False


@dataclass
class DataConfig:
    """Where the examples are and which fields hold what."""

    # a file (.jsonl/.json/.csv/.parquet/.txt, optionally .gz/.bz2/.xz/.zst), a glob, a list of files, a
    # directory of data files, a save_to_disk dir, an image folder, or a hub name; or a mixture: a list of
    # sources {path, weight | num_samples, any per-source data key (format, fields, template, roles)}
    train: Any = None
    eval: Any = None
    text_field: str = "text"
    text_pair_field: Optional[str] = None  # classification/regression: a second text, encoded as a pair (NLI, STS)
    label_field: str = "label"
    label_fields: Optional[list[str]] = None  # regression: several numeric targets (instead of label_field)
    normalize_targets: bool = True  # regression: standardize targets for training (folded back into the saved head)
    label_separator: Optional[str] = None  # multi-label: split a string label into names (null: a list column)
    tokens_field: str = "tokens"  # token-classification: a list of words
    tags_field: str = "tags"  # token-classification: one tag per word
    label_all_subtokens: bool = False  # token-classification: train every sub-token on its word's tag
    question_field: str = "question"  # question-answering
    context_field: str = "context"  # question-answering
    answers_field: str = "answers"  # question-answering: {text: [...], answer_start: [...]}; empty = unanswerable
    stride: int = 128  # token-classification / question-answering: tokens shared by consecutive windows (<= half)
    prompt_field: str = "prompt"
    response_field: str = "response"
    chosen_field: str = "chosen"  # preference: the preferred completion (text or assistant messages)
    rejected_field: str = "rejected"  # preference: the dispreferred completion
    image_field: str = "image"
    caption_field: Optional[str] = None  # image-generation: a caption column makes fine-tuning text-conditional
    audio_field: str = "audio"  # speech-recognition: an audio file path (relative to the data file) or an Audio column
    max_duration: Optional[float] = (
        30.0  # speech-recognition: longer clips (seconds) are skipped and counted, never cut
    )
    lowercase: bool = False  # speech-recognition: lowercase transcripts before training and scoring
    chars_to_ignore: list[str] = field(default_factory=list)  # speech-recognition: removed from transcripts
    language: Optional[str] = None  # speech-recognition (Whisper): the language token, e.g. en / english
    asr_task: str = "transcribe"  # speech-recognition (Whisper): transcribe | translate
    template: Optional[str] = (
        None  # e.g. "{prompt} =>", or "chat"; encoder-decoder: a source prefix "translate: {prompt}"
    )
    format: str = "auto"  # auto | prompt-response | messages | sharegpt | alpaca | translation
    source_lang: Optional[str] = (
        None  # translation rows {"translation": {lang: text}}: the source key (en, en_XX, eng_Latn)
    )
    target_lang: Optional[str] = (
        None  # ... the target key; multilingual models (NLLB, mBART) start replies with its token
    )
    max_target_length: Optional[int] = None  # encoder-decoder: target tokens kept (null: data.max_length)
    messages_field: Optional[str] = None  # the turns column (default: messages, or conversations for sharegpt)
    roles: dict[str, str] = field(default_factory=dict)  # extra role names -> system | user | assistant | tool
    chat_template: Optional[str] = None  # null: the tokenizer's own; chatml | llama3 | qwen2.5 | mistral; a .jinja path
    history: str = "auto"  # auto | whole | per-turn: how a conversation's replies become training examples
    max_length: int = 128
    packing: bool = False
    unlabeled: Any = None  # an unlabeled corpus for the auxiliary LM loss (same forms as train)
    cache_dir: Optional[str] = None  # parsed + tokenized data (`sft prepare`); null: .sft-cache beside output.dir
    num_proc: int = 1  # worker processes for parsing and tokenizing
    streaming: bool = (
        False  # pretraining: read data.train as a stream (never all in memory); needs max_steps/max_tokens
    )
    shuffle_buffer: int = 1000  # streaming: token blocks held by the seeded shuffle buffer
    image_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    skip_invalid: bool = False  # skip (and count) unreadable images and invalid conversations instead of failing


@dataclass
class LoraConfig:
    """PEFT LoRA settings for `freeze.policy: lora`."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None  # None: a default per architecture


@dataclass
class FreezeConfig:
    """Which parameters train."""

    policy: str = "none"
    last_n: int = 1
    embeddings: Optional[bool] = None  # True freezes, False unfreezes embeddings on top of any policy
    feature_encoder: Optional[bool] = None  # speech: the CNN over the waveform; null: frozen when pretrained
    encoder: Optional[bool] = None  # encoder-decoder: True freezes, False unfreezes the encoder on top of any policy
    trainable: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class LossConfig:
    """The loss mix: L = supervised * L_sup + lm * L_lm."""

    supervised: float = 1.0
    lm: float = 0.0
    prompt: float = 0.0  # generation: weight of untrained tokens (prompt, user turns; 0 = masked)
    train_on: str = "assistant"  # conversations: assistant (every reply) | last (the final reply) | all (every token)
    class_weights: Any = None  # classification: null | balanced | {label: weight}
    label_smoothing: float = 0.0  # classification: 0 <= x < 1
    regression: str = "mse"  # regression: mse | huber | l1
    prediction: Optional[str] = None  # image-generation: epsilon | v_prediction (null: the backbone's, else epsilon)
    noise_schedule: Optional[str] = None  # image-generation: linear | scaled_linear | squaredcos_cap_v2 (null: the
    # backbone's scheduler, else linear)
    snr_gamma: Optional[float] = None  # image-generation: min-SNR loss weighting (5.0 is the paper's); null: off
    cond_dropout: float = 0.1  # image-generation: share of training examples whose class / caption is dropped (CFG)
    preference: str = "dpo"  # preference: dpo | ipo | orpo | simpo
    beta: float = 0.1  # preference: DPO / IPO's KL strength; ORPO's odds-ratio weight; SimPO's reward scale
    gamma: float = 0.5  # preference: SimPO's target reward margin
    sft_weight: Optional[float] = None  # preference: weight of the NLL on chosen completions (RPO; ORPO's own
    # term); null: 1.0 for orpo, 0 otherwise
    reference: str = "precompute"  # preference (dpo, ipo): precompute (once, before training, cached with the data)
    # | adapters-off (on the fly, the LoRA model with its adapters disabled)


@dataclass
class OptimConfig:
    """Optimizer."""

    name: str = "adamw"
    lr: float = 5.0e-5
    weight_decay: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    layer_lr_decay: Optional[float] = None


@dataclass
class EarlyStoppingConfig:
    """Stop when the metric has not improved for `patience` evaluations."""

    metric: str = "eval_loss"
    mode: str = "min"
    patience: int = 2


@dataclass
class ScheduleConfig:
    """How long and how fast to train."""

    epochs: float = 3
    max_steps: Optional[int] = None  # caps epochs
    max_tokens: Optional[int] = None  # language-modeling: a token budget (caps epochs and max_steps)
    batch_size: int = 32  # per process
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    warmup: float = 0.1  # a ratio of the steps (< 1) or a number of steps (>= 1)
    scheduler: str = "linear"
    step_size: Optional[int] = None  # `step` scheduler: steps between decays (default: one epoch)
    gamma: float = 0.1  # `step` decay factor, `plateau` reduction factor
    eval_every: str = "epoch"  # "epoch" or a number of optimizer steps
    early_stopping: Optional[EarlyStoppingConfig] = None
    log_every: int = 10
    group_by_length: Optional[bool] = None  # null: the task's default (on for classification; benchmarks/GROUPING.md)


@dataclass
class DistributedConfig:
    """Multi-process settings, passed to Accelerate."""

    strategy: str = "ddp"  # ddp | fsdp (FSDP2) | deepspeed (ZeRO, `sft[deepspeed]`); CUDA, or CPU over gloo
    fsdp: dict[str, Any] = field(default_factory=dict)  # FullyShardedDataParallelPlugin options (cpu_offload, ...)
    zero_stage: int = 2  # deepspeed: ZeRO stage 1 | 2 | 3 (when no deepspeed_config)
    deepspeed_config: Optional[str] = None  # deepspeed: a DeepSpeed JSON config file instead of zero_stage


@dataclass
class EngineConfig:
    """Device and numerics."""

    device: str = "auto"
    precision: str = "auto"
    seed: int = 42
    skip_nonfinite: bool = False
    grad_checkpointing: bool = False
    compile: bool = False
    num_workers: int = 0
    attention: str = "auto"  # auto: sdpa on GPU and for encoders; eager for decoders on CPU; or eager | sdpa
    kernels: str = "auto"  # auto: fused kernels (Liger) on CUDA when installed; none: plain PyTorch everywhere
    ema: bool = False  # keep an exponential moving average of the weights, used for eval, samples and the saved model
    ema_decay: float = 0.9999  # the EMA's largest decay (warmed up: 1 - (1 + step)^-3/4 until it reaches this)
    peak_tflops: Optional[float] = None  # for MFU in summary.json; None: measured with a short matmul
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class OutputConfig:
    """What the run leaves on disk."""

    dir: str = "runs/run"
    save_every: Optional[int] = None
    keep: int = 2
    keep_best: bool = True
    merge_lora: bool = False
    tensorboard: bool = False  # the same as report_to: [tensorboard] (events in output.dir/tensorboard)
    report_to: list[str] = field(default_factory=list)  # tensorboard | mlflow | wandb | comet_ml | aim | clearml | ...
    tracker: dict[str, Any] = field(default_factory=dict)  # options per tracker: {mlflow: {tracking_uri,
    # experiment_name, run_name, tags}, wandb: {project, mode, entity, dir, name, tags}, tensorboard: {logging_dir}}
    tracker_required: bool = False  # a tracker that cannot start fails the run (default: a warning, training goes on)


@dataclass
class EvalConfig:
    """Held-out evaluation."""

    batch_size: int = 64
    num_beams: int = 1
    max_new_tokens: int = 32
    length_penalty: float = 1.0  # beam search: > 1 favours longer outputs, < 1 shorter (only with num_beams > 1)
    no_repeat_ngram_size: int = 0  # generation: never repeat an n-gram of this size (0: off)
    threshold: float = 0.5  # multi-label: a label is predicted when its probability is >= threshold
    tune_threshold: bool = False  # multi-label / question-answering (v2): tune the threshold on eval, save it
    max_answer_length: int = 30  # question-answering: longest answer span, in tokens
    n_best: int = 20  # question-answering: start and end candidates searched per window
    null_threshold: float = 0.0  # question-answering: answer "" when null score - best span score > this
    num_samples: int = 64  # image-generation: images sampled per evaluation (spread evenly over classes / captions)
    num_inference_steps: int = 25  # image-generation: sampler steps
    sampler: str = "ddim"  # image-generation: ddim | dpm-solver | ddpm
    guidance_scale: float = 1.0  # image-generation: classifier-free guidance (1: none; conditional models only)
    feature_model: Optional[str] = None  # image-generation: an image classifier (a model directory, e.g. an sft
    # image-classification run's model/) whose features give FID / IS / class accuracy; inception-v3 where installed


@dataclass
class PredictConfig:
    """`sft predict` / `sft chat`: batching and decoding (greedy unless do_sample)."""

    batch_size: int = 32
    top_k: int = 5  # classification: how many label -> probability pairs `scores` holds
    max_new_tokens: int = 128
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None  # sampling seed (default: engine.seed)
    num_images: int = 1  # image-generation: images per input row (a row's `num_images` overrides)
    num_inference_steps: Optional[int] = None  # image-generation: sampler steps (null: eval.num_inference_steps)
    guidance_scale: Optional[float] = None  # image-generation: classifier-free guidance (null: eval.guidance_scale)


@dataclass
class Recipe:
    """A whole run."""

    name: str = "run"
    task: str = "classification"
    objective: str = "auto"  # language-modeling: clm | mlm | span | denoise | auto (by architecture)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    sweep: dict[str, Any] = field(default_factory=dict)
