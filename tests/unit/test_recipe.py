"""Recipe schema: defaults, overrides, strictness, types, ranges."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_cli.config.recipe import Recipe, load_recipe
from sft_cli.errors import SftError


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
        (
            "data: {train: t}\nengine: {skip_nonfinite: true, distributed: {strategy: deepspeed}}\n",
            [],
            "'engine.skip_nonfinite': DeepSpeed steps inside backward",
        ),
        ("data: {train: t}\n", ["engine.distributed.deepspeed_config=nope.json"], "file not found: nope.json"),
        ("data: {train: t}\noutput: {report_to: [mlflw]}\n", [], "did you mean 'mlflow'"),
        ("data: {train: t}\noutput: {report_to: mlflow}\n", [], "'output.report_to' expects list"),
        ("data: {train: t}\noutput: {report_to: [wandb], tracker: {wandb: offline}}\n", [], "output.tracker.wandb"),
        ("data: {train: t}\noutput: {tracker: {mlflow: {tracking_uri: x}}}\n", [], "not in output.report_to"),
        (
            "data: {train: t}\noutput: {report_to: [mlflow], tracker: {mlflow: {experiment: x}}}\n",
            [],
            "did you mean 'experiment_name'",
        ),
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


@pytest.mark.parametrize(
    "text, lines",
    [
        ("data: {train: t}\nschedule: {epochs: 1}\ntask: generation\nschedule:\n  batch_size: 4\n", "lines 2 and 4"),
        ("task: generation\ndata: {train: t}\ntask: classification\n", "lines 1 and 3"),
        ("data:\n  train: a\n  eval: b\n  train: c\n", "lines 2 and 4"),
    ],
)
def test_a_key_given_twice_is_refused_with_both_line_numbers(tmp_path, text, lines):
    with pytest.raises(SftError) as err:
        load_recipe(write(tmp_path, text))
    assert "given twice" in str(err.value) and lines in str(err.value)


def _numeric_keys(schema=Recipe, prefix=""):
    """Every int/float (or list of them) key of the schema, found by walking the dataclasses."""
    import dataclasses
    import typing

    from sft_cli.config.recipe import _nested_dataclass

    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        annotation = hints[item.name]
        nested = _nested_dataclass(annotation)
        if nested is not None:
            yield from _numeric_keys(nested, f"{prefix}{item.name}.")
            continue
        args = set(typing.get_args(annotation)) | {annotation}
        inner = {a for x in args for a in typing.get_args(x)} | args
        if (inner & {int, float}) and bool not in inner and dict not in {typing.get_origin(a) for a in args}:
            yield f"{prefix}{item.name}"


def test_every_numeric_key_has_bounds():
    from sft_cli.config.validation import RANGES

    missing = sorted(set(_numeric_keys()) - set(RANGES))
    assert not missing, f"numeric recipe keys without a RANGES row: {missing}"
    assert {"schedule.warmup", "optim.lr", "engine.seed", "data.max_length"} <= set(RANGES)


def _out_of_range_cases():
    from sft_cli.config.validation import RANGES

    cases = []
    for key, (low, low_in, high, _high_in) in RANGES.items():
        if low is not None:
            cases.append((key, low - 1 if low_in else low))
            cases.append((key, low - 1000))
        if high is not None:
            cases.append((key, high + 1))
    return cases


@given(case=st.sampled_from(_out_of_range_cases()))
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_out_of_range_numbers_are_one_line_errors_naming_the_key(tmp_path, case):
    key, value = case
    integral = key in {"tokenizer.vocab_size", "data.max_length", "data.image_size", "freeze.last_n", "freeze.lora.r"}
    integral |= key.split(".")[-1] in {
        "random_crop_padding",
        "max_steps",
        "batch_size",
        "grad_accum",
        "step_size",
        "patience",
        "log_every",
        "seed",
        "num_workers",
        "save_every",
        "keep",
        "num_beams",
        "max_new_tokens",
    }
    value = int(value) if integral else float(value)
    if key in {"optim.betas", "data.std"}:
        value = [value, value] if key == "optim.betas" else [value]
        override = f"{key}=[{', '.join(map(str, value))}]"
    else:
        override = f"{key}={value}"
    extra = ["schedule.early_stopping={metric: eval_loss}"] if "early_stopping" in key else []
    with pytest.raises(SftError) as err:
        load_recipe(write(tmp_path, "data: {train: t}\n"), [*extra, override])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_negative_warmup_is_refused(tmp_path):
    with pytest.raises(SftError, match=r"'schedule.warmup' must be >= 0; got -1"):
        load_recipe(write(tmp_path, "data: {train: t}\n"), ["schedule.warmup=-1"])


def test_a_deepspeed_config_file_that_sets_the_optimizer_is_refused_naming_the_key(tmp_path):
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}')
    overrides = ["engine.distributed.strategy=deepspeed", f"engine.distributed.deepspeed_config={tmp_path / 'ds.json'}"]
    with pytest.raises(SftError, match="'engine.distributed.deepspeed_config'.*remove its 'optimizer' section"):
        load_recipe(write(tmp_path, "data: {train: t}\n"), overrides)


def test_the_tracker_options_sft_checks_are_the_installed_libraries_arguments():
    import inspect

    from sft_cli.config.schema import TRACKER_OPTIONS

    wandb = pytest.importorskip("wandb")
    from accelerate.tracking import MLflowTracker
    from torch.utils.tensorboard import SummaryWriter

    def arguments(function):
        return {name for name in inspect.signature(function).parameters if name != "self"}

    assert set(TRACKER_OPTIONS["mlflow"]) == arguments(MLflowTracker.__init__) | {"tracking_uri"}
    assert set(TRACKER_OPTIONS["wandb"]) == arguments(wandb.init)
    assert set(TRACKER_OPTIONS["tensorboard"]) == arguments(SummaryWriter.__init__) - {"log_dir"} | {"logging_dir"}
