"""output.report_to: an MLflow server (SQLite) on a free port, W&B offline and TensorBoard all receive the run."""

from __future__ import annotations

import glob
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import recipe_values

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")
pytest.importorskip("tensorboard")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` with a SQLite backend and a local artifact store, on a free localhost port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}", "--artifacts-destination", str(root / "art")]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("the MLflow server did not start")
            time.sleep(0.5)
    yield uri
    server.terminate()
    server.wait(timeout=30)


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wandb_history(path: str) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log framed protobuf records, as `wandb sync` reads)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, block, pending, rows = 7, 32768, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def assert_series(got: list, expected: list) -> None:
    """(step, value) pairs: the same steps, the same values (TensorBoard keeps float32)."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)


def tensorboard_scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_mlflow_wandb_and_tensorboard_receive_params_metrics_and_artifacts(tmp_path: Path, mlflow_server: str) -> None:
    run_dir = tmp_path / "run"
    trackers = {"mlflow": {"tracking_uri": mlflow_server, "experiment_name": "sft-tests"}, "wandb": {"mode": "offline"}}
    values = recipe_values(
        tmp_path,
        schedule={"epochs": 2, "batch_size": 16, "warmup": 0.0, "log_every": 4, "eval_every": "8"},
        output={"dir": str(run_dir), "report_to": ["mlflow", "wandb"], "tensorboard": True, "tracker": trackers},
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe

    commands.train(load_recipe(recipe), "finetune")
    # `sft eval` with another eval batch size: the same tracker runs (MLflow keeps the params it was started with)
    commands.evaluate_model(load_recipe(recipe, ["eval.batch_size=16"]))

    rows = metric_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert len(losses) == 8 and len(evals) == 4

    # MLflow: the recipe as params, every logged value at its step, the pictures and reports as artifacts
    client = mlflow.tracking.MlflowClient(mlflow_server)
    run_id = summary["trackers"]["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["data.max_length"] == "32"
    assert run.data.params["task"] == "classification" and run.data.params["output.report_to"] == '["mlflow", "wandb"]'
    assert_series([(m.step, m.value) for m in client.get_metric_history(run_id, "loss")], losses)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval_loss")]
    assert_series(history[:-1], evals)  # then `sft eval`'s, at the trained step
    eval_json = json.loads((run_dir / "eval.json").read_text())
    assert_series(history[-1:], [(summary["steps"], eval_json["loss"])])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"report.png", "summary.json", "confusion_matrix.png", "eval.json"} <= artifacts
    assert run.info.status == "FINISHED"

    # W&B offline: a run directory whose history holds the same values at the same steps
    wandb_run = summary["trackers"]["wandb"]
    files = glob.glob(f"{wandb_run['dir']}/run-{wandb_run['run_id']}.wandb")
    assert files and Path(wandb_run["dir"]).parent == run_dir / "wandb"
    logged = {(h["step"], h["loss"]) for h in wandb_history(files[0]) if "loss" in h}
    assert_series(sorted(logged), losses)
    logged_evals = {(h["step"], h["eval_loss"]) for h in wandb_history(files[0]) if "eval_loss" in h}
    assert_series(sorted(logged_evals), evals)

    # TensorBoard (output.tensorboard: true): event files in output.dir/tensorboard with the same scalars
    assert_series(tensorboard_scalars(run_dir / "tensorboard", "loss"), losses)
    assert_series(tensorboard_scalars(run_dir / "tensorboard", "eval_loss")[: len(evals)], evals)


def test_an_unreachable_tracker_warns_and_training_goes_on_or_fails_when_required(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sft_cli.commands import train as commands
    from sft_cli.config.recipe import load_recipe
    from sft_cli.errors import SftError

    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    output = {"dir": str(tmp_path / "run"), "report_to": ["mlflow"], "tracker": {"mlflow": {"tracking_uri": nowhere}}}
    values = recipe_values(tmp_path, schedule={"epochs": 1, "batch_size": 32, "log_every": 4}, output=output)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    started = time.time()
    summary = commands.train(load_recipe(recipe), "finetune")
    assert time.time() - started < 60
    assert "trackers" not in summary and summary["steps"] == 8
    assert any("output.report_to: mlflow cannot be used" in r.message for r in caplog.records)

    required = load_recipe(recipe, ["output.tracker_required=true", f"output.dir={tmp_path / 'run2'}"])
    with pytest.raises(SftError, match=r"^output.report_to: mlflow cannot be used — no tracking server answers at"):
        commands.train(required, "finetune")
