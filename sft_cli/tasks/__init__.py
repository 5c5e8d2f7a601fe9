"""Task registry: a plain name -> class mapping (no import strings in recipes)."""

from __future__ import annotations

from sft_cli.errors import SftError
from sft_cli.recipe import Recipe
from sft_cli.tasks.base import Task


def _registry() -> dict[str, type[Task]]:
    from sft_cli.tasks.classification import ClassificationTask

    registry: dict[str, type[Task]] = {"classification": ClassificationTask}
    try:
        from sft_cli.tasks.language_modeling import LanguageModelingTask

        registry["language-modeling"] = LanguageModelingTask
    except ImportError:
        pass
    try:
        from sft_cli.tasks.generation import GenerationTask

        registry["generation"] = GenerationTask
    except ImportError:
        pass
    try:
        from sft_cli.tasks.image_classification import ImageClassificationTask

        registry["image-classification"] = ImageClassificationTask
    except ImportError:
        pass
    return registry


def build_task(recipe: Recipe) -> Task:
    """The task object named by `recipe.task`."""
    registry = _registry()
    if recipe.task not in registry:
        raise SftError(f"task: '{recipe.task}' is not supported yet (available: {', '.join(registry)})")
    return registry[recipe.task](recipe)
