"""The text-to-text pipeline saved with every encoder-decoder model sft writes.

transformers 5 removed its translation, summarization and text2text-generation pipelines; a model directory
that sft writes carries this file and names it in `config.json` (`custom_pipelines`), so that

    pipeline("translation", model="run/model", trust_remote_code=True)("The file is closed.")
    # [{"translation_text": "..."}]   ("summarization": summary_text, "text2text-generation": generated_text)

loads and decodes exactly as `sft predict` does: the source written with the training template
(`config.sft_source_template`), cut to the training length (`config.sft_max_source_length`) and ended with EOS,
then `generate` with the saved generation_config (the recipe's `predict:` search settings).

This file is copied into model directories: it imports only the standard library and transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from transformers import Pipeline

OUTPUT_KEYS = {
    "translation": "translation_text",
    "summarization": "summary_text",
    "text2text-generation": "generated_text",
}
FILE_NAME = "sft_seq2seq_pipeline.py"
SEARCH_KEYS = (
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "no_repeat_ngram_size",
    "do_sample",
    "temperature",
    "top_p",
)


class Seq2SeqPipeline(Pipeline):
    """Source text in, generated text out, for any `AutoModelForSeq2SeqLM` sft trained."""

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        return {}, {k: kwargs[k] for k in SEARCH_KEYS if k in kwargs}, {}

    def preprocess(self, text: str) -> dict[str, Any]:
        config, tokenizer = self.model.config, self.tokenizer
        template = getattr(config, "sft_source_template", None) or "{prompt}"
        limit = getattr(config, "sft_max_source_length", None) or tokenizer.model_max_length
        ids = tokenizer(template.format(prompt=text), add_special_tokens=True)["input_ids"]
        eos, tail = tokenizer.eos_token_id, ids[-2:]  # the text's ending (EOS, or EOS + language): kept when cut
        suffix = tail[tail.index(eos) :] if eos in tail else [eos]
        body = ids[: len(ids) - len(suffix)] if eos in tail else ids
        ids = body[: limit - len(suffix)] + suffix
        import torch

        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}

    def _forward(self, inputs: dict[str, Any], **search: Any) -> Any:
        return self.model.generate(**inputs, **search)

    def postprocess(self, output: Any) -> list[dict[str, str]]:
        ids = output[0, 1:].tolist()  # after the decoder start token
        eos = self.tokenizer.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        key = OUTPUT_KEYS.get(self.task, "generated_text")
        return [{key: self.tokenizer.decode(ids, skip_special_tokens=True).strip()}]


def custom_pipelines() -> dict[str, dict[str, Any]]:
    """config.json's `custom_pipelines`: this file's class for the three text-to-text tasks."""
    impl = {"impl": f"{FILE_NAME[:-3]}.Seq2SeqPipeline", "pt": ["AutoModelForSeq2SeqLM"], "type": "text"}
    return {task: dict(impl) for task in OUTPUT_KEYS}


def copy_pipeline(directory: Path) -> None:
    """Put this file beside a saved model whose config names it (`custom_pipelines`)."""
    shutil.copyfile(Path(__file__), Path(directory) / FILE_NAME)
