"""Task registry: a plain name -> class mapping (no import strings in recipes); one line per task."""

from __future__ import annotations

from sft_cli.config.schema import Recipe
from sft_cli.errors import SftError
from sft_cli.tasks.base import Task
from sft_cli.tasks.classification import ClassificationTask
from sft_cli.tasks.generation import GenerationTask
from sft_cli.tasks.image_classification import ImageClassificationTask
from sft_cli.tasks.image_generation import ImageGenerationTask
from sft_cli.tasks.language_modeling import LanguageModelingTask
from sft_cli.tasks.multi_label import MultiLabelTask
from sft_cli.tasks.preference import PreferenceTask
from sft_cli.tasks.question_answering import QuestionAnsweringTask
from sft_cli.tasks.regression import RegressionTask
from sft_cli.tasks.speech_recognition import SpeechRecognitionTask
from sft_cli.tasks.token_classification import TokenClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "regression": RegressionTask,
    "multi-label-classification": MultiLabelTask,
    "token-classification": TokenClassificationTask,
    "question-answering": QuestionAnsweringTask,
    "image-classification": ImageClassificationTask,
    "generation": GenerationTask,
    "language-modeling": LanguageModelingTask,
    "speech-recognition": SpeechRecognitionTask,
    "image-generation": ImageGenerationTask,
    "preference": PreferenceTask,
}


def build_task(recipe: Recipe) -> Task:
    """The task object named by `recipe.task`."""
    if recipe.task not in TASKS:
        raise SftError(f"task: '{recipe.task}' is not supported (available: {', '.join(TASKS)})")
    return TASKS[recipe.task].variant(recipe)(recipe)
