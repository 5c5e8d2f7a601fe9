"""README.md model cards for model/ and exports, in the Hugging Face layout (YAML front matter + sections)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Optional

import yaml

from sft_cli.config.schema import Recipe
from sft_cli.tasks.specs import TASK_SPECS

HUB_NAMES = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}  # embedded aliases -> where they come from


def base_model(recipe: Recipe) -> str:
    """The model this one started from (a hub id where known), or the architecture it was built from."""
    spec = recipe.backbone
    if spec.from_scratch:
        return f"none (trained from scratch: {spec.arch or spec.name} architecture)"
    return HUB_NAMES.get(spec.name, spec.name)


def hardware(summary: dict[str, Any]) -> str:
    """What trained it: device, precision, processes, and the processor or GPU name."""
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name()
    device, precision = summary.get("device", "?"), summary.get("precision", "?")
    return f"{name}; device {device}, precision {precision}, {summary.get('num_processes', 1)} process(es)"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _data_line(key: str, location: Any) -> Optional[str]:
    if not location:
        return None
    if isinstance(location, (list, tuple)):  # a list of files, or a mixture's sources
        lines = [_data_line(f"{key}[{i}]", item) for i, item in enumerate(location)]
        return "\n".join(line for line in lines if line)
    if isinstance(location, dict):
        share = {k: v for k, v in location.items() if k in ("weight", "num_samples")}
        line = _data_line(key, location.get("path"))
        return f"{line} ({', '.join(f'{k} {v}' for k, v in share.items())})" if line and share else line
    path = Path(str(location))
    size = f", {path.stat().st_size:,} bytes" if path.is_file() else (", a directory" if path.is_dir() else "")
    return f"- `{key}`: `{location}`{size}"


def render(recipe: Recipe, run_dir: Path, model_dir: Path, labels: Optional[list[str]] = None) -> str:
    """The card's text from the recipe, summary.json and eval.json of a run."""
    from sft_cli.config.recipe import to_yaml

    summary = _read(run_dir / "summary.json")
    metrics = {k: v for k, v in _read(run_dir / "eval.json").items() if isinstance(v, (int, float))}
    tags = ["sft", recipe.task]
    if recipe.freeze.policy == "lora":
        tags.append("lora")
    if recipe.task in ("generation", "preference") and (
        recipe.data.chat_template or recipe.data.format not in ("auto", "prompt-response")
    ):
        tags.append("conversational")
    library = "peft" if (model_dir / "adapter_config.json").exists() else "transformers"
    pipeline_tag = TASK_SPECS[recipe.task].pipeline_tag
    diffusion = _read(model_dir / "sft_diffusion.json")  # image generation: a diffusers model
    if diffusion:
        library = "diffusers"
        text = diffusion.get("mode") == "text" or diffusion.get("latent_pipeline")
        pipeline_tag = "text-to-image" if text else "unconditional-image-generation"
    front = {
        "base_model": base_model(recipe),
        "library_name": library,
        "pipeline_tag": pipeline_tag,
        "tags": tags,
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {recipe.name}", ""]
    lines += [f"A `{recipe.task}` model trained with `sft` from `{front['base_model']}`.", ""]
    if labels:
        lines += ["## Labels", "", ", ".join(f"`{label}`" for label in labels), ""]
    lines += ["## Data", ""]
    lines += [
        line for key in ("train", "eval", "unlabeled") if (line := _data_line(f"data.{key}", getattr(recipe.data, key)))
    ]
    if summary.get("skipped_rows"):
        lines.append(
            f"- rows left out: {summary['skipped_rows']} ({json.dumps(summary.get('skipped_rows_by_split', {}))})"
        )
    lines += ["", "## Results", ""]
    source = "eval.json (`sft eval` on data.eval)" if metrics else "the last evaluation during training"
    if not metrics:
        metrics = {k.removeprefix("eval_"): v for k, v in (summary.get("eval") or {}).items() if k.startswith("eval_")}
    lines += [f"From {source}:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()] or [
        "| — | — |"
    ]
    lines += ["", "## Training", ""]
    if summary:
        lines += [
            f"- {summary.get('steps', '?')} steps, {summary.get('train_seconds', 0):,.0f} s of training, "
            f"{summary.get('train_tokens', 0):,} tokens ({summary.get('tokens_per_s', 0):,.0f} tokens/s)",
            f"- trainable parameters: {summary.get('trainable_params', 0):,} of {summary.get('total_params', 0):,}",
            f"- hardware: {hardware(summary)}",
        ]
    lines += ["", "## Intended use and limits", "", TASK_SPECS[recipe.task].card_use]
    lines += [
        "It was trained on the data above only: expect it to do poorly on text, images or questions unlike them, "
        "and check its outputs before relying on them. The metrics above are from the held-out split named in "
        "the recipe, not from an independent benchmark.",
        "",
        "## Recipe (resolved)",
        "",
        "```yaml",
        to_yaml(recipe).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(recipe: Recipe, run_dir: Path, model_dir: Path, labels: Optional[list[str]] = None) -> None:
    """Write (or refresh) model_dir/README.md."""
    from sft_cli.rundir.atomic import write_text_atomic

    if model_dir.is_dir():
        write_text_atomic(model_dir / "README.md", render(recipe, run_dir, model_dir, labels))


def _read(path: Path) -> dict[str, Any]:
    from sft_cli.rundir.atomic import read_json_object

    return read_json_object(path)
