"""Every shipped recipe validates against the schema, and starts with the command that runs it."""

from pathlib import Path

import pytest

from sft_cli.config.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.data.train
    first = path.read_text().splitlines()[0]
    assert first.startswith("# sft ") and str(path.relative_to(REPO)) in first
