"""Recipe schema: defaults, overrides, strictness, types, ranges."""

import pytest

from sft_cli.errors import SftError
from sft_cli.recipe import Recipe, load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_come_from_the_schema(tmp_path):
    recipe = load_recipe(write(tmp_path, "data: {train: t.jsonl}\n"))
    assert recipe == Recipe(data=recipe.data)
    assert recipe.optim.lr == 5e-5 and recipe.schedule.batch_size == 32 and recipe.freeze.policy == "none"
    assert recipe.backbone.name == "minilm-l6" and recipe.engine.precision == "auto"


def test_overrides_win_and_create_nested_keys(tmp_path):
    path = write(tmp_path, "data: {train: t.jsonl}\noptim: {lr: 1.0e-3}\n")
    recipe = load_recipe(
        path, ["optim.lr=3e-5", "schedule.epochs=1", "backbone.config.num_hidden_layers=2", "output.dir=/tmp/x"]
    )
    assert recipe.optim.lr == 3e-5
    assert recipe.schedule.epochs == 1
    assert recipe.backbone.config == {"num_hidden_layers": 2}
    assert recipe.output.dir == "/tmp/x"


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("data: {train: t}\noptim: {lrr: 1}\n", [], "did you mean 'optim.lr'"),
        ("data: {train: t}\nschedul: {epochs: 1}\n", [], "did you mean 'schedule'"),
        ("data: {train: t}\n", ["schedule.batchsize=4"], "did you mean 'schedule.batch_size'"),
        ("data: {train: t}\nschedule: {batch_size: many}\n", [], "'schedule.batch_size' expects int"),
        ("data: {train: t}\nbackbone: {from_scratch: maybe}\n", [], "'backbone.from_scratch' expects bool"),
        ("data: {train: t}\noptim: {lr: 0}\n", [], "'optim.lr' must be > 0"),
        ("data: {train: t}\nschedule: {warmup: 1.5}\n", [], "schedule.warmup"),
        ("data: {train: t}\ntask: clasification\n", [], "did you mean 'classification'"),
        ("data: {train: t}\n", ["optim.lr"], "expected key=value"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("data: {train: t\n", [], "line"),
        ("{}\n", [], "'data.train' is required"),
    ],
)
def test_bad_recipes_fail_before_compute_naming_the_key(tmp_path, text, overrides, expected):
    with pytest.raises(SftError) as err:
        load_recipe(write(tmp_path, text), overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(SftError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_interpolation_limited_to_recipe_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_TEST_DIR", "/tmp/from-env")
    recipe = load_recipe(
        write(tmp_path, "name: x\ndata: {train: t}\noutput: {dir: '${oc.env:SFT_TEST_DIR}/${name}'}\n")
    )
    assert recipe.output.dir == "/tmp/from-env/x"
    with pytest.raises(SftError, match="interpolations"):
        load_recipe(write(tmp_path, "data: {train: '${oc.create:x}'}\n"))
