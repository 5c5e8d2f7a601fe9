"""`sft serve` through the official `openai` client: the same replies as `sft chat`, streamed or not, batched
under concurrency, OpenAI-shaped errors, the API key, and `/v1/predict` giving what `sft predict` writes."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from sft_cli.commands import train as commands
from sft_cli.commands.chat import ChatSession, load_task
from sft_cli.commands.predict import predict
from sft_cli.commands.serve import bind, build_app
from sft_cli.config.recipe import load_recipe
from tests.conftest import read_jsonl, recipe_values, write_jsonl, write_recipe
from tests.integration.test_chat import CHAT, chat_values

pytestmark = pytest.mark.integration
KEY = "test-key"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_decoder):
    tmp = tmp_path_factory.mktemp("serve")
    values = chat_values(tmp, tiny_decoder)
    values["schedule"].update(max_steps=40)
    values["predict"] = {"max_new_tokens": 12, "batch_size": 8}
    recipe = load_recipe(write_recipe(tmp / "chat.yaml", values))
    commands.train(recipe, "finetune")
    return tmp, recipe


@pytest.fixture(scope="module")
def served(chat_run):
    """The chat run served in this process on a free port (the app `sft serve` builds), with an API key."""
    tmp, recipe = chat_run
    task = load_task(recipe, tmp / "run" / "model")
    app = build_app(task, recipe, "run", api_key=KEY)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", app, task, recipe
    server.should_exit = True
    thread.join(timeout=30)


def client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def sft_chat_reply(task, recipe, history: list[dict]) -> str:
    """What `sft chat` answers after this history (its ChatSession, greedy by default)."""
    session = ChatSession(task, recipe)
    if history[0]["role"] == "system":
        session.system, history = history[0]["content"], history[1:]
    session.turns = list(history[:-1])
    return session.reply(history[-1]["content"])


def histories(count: int) -> list[list[dict]]:
    """Conversations from the held-out file, cut before their last answer (some with a system prompt)."""
    return [row["messages"][:-1] for row in read_jsonl(CHAT / "test.jsonl")[:count]]


def test_chat_completion_equals_sft_chats_greedy_reply(served):
    url, _, task, recipe = served
    for history in histories(3):
        expected = sft_chat_reply(task, recipe, history)
        reply = client(url).chat.completions.create(model="run", messages=history)
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.model == "run"
        assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 0
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["run"]


def test_streaming_yields_the_same_text(served):
    url, _, task, recipe = served
    history = histories(2)[1]
    expected = sft_chat_reply(task, recipe, history)
    chunks = list(client(url).chat.completions.create(model="run", messages=history, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # really streamed, piece by piece
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    # a stop string cuts the reply there, streamed or not
    stop = expected[len(expected) // 2 : len(expected) // 2 + 2]
    cut = expected[: expected.find(stop)]
    whole = client(url).chat.completions.create(model="run", messages=history, stop=[stop])
    assert whole.choices[0].message.content == cut and whole.choices[0].finish_reason == "stop"
    pieces = client(url).chat.completions.create(model="run", messages=history, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == cut


def test_eight_concurrent_clients_all_get_answers_in_batches(served, monkeypatch):
    url, app, task, recipe = served
    conversations = histories(8)
    worker = app.state.worker
    before = worker.generate_calls
    answers: dict[int, str] = {}
    gate = threading.Event()  # the worker's first decode waits until the other requests have queued behind it
    execute = worker.execute
    monkeypatch.setattr(worker, "execute", lambda group: gate.wait(30) and execute(group))

    def ask(index: int) -> None:
        reply = client(url).chat.completions.create(model="run", messages=conversations[index])
        answers[index] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while worker.inbox.qsize() < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == list(range(8)) and all(answers.values())
    assert worker.generate_calls - before <= 2 and worker.largest_batch >= 7  # decoded together, not one by one
    # a batch decodes each conversation as it would alone
    assert [answers[i] for i in range(8)] == [sft_chat_reply(task, recipe, h) for h in conversations]


def test_completions_render_a_plain_prompt_as_predict_does(served):
    url, _, task, recipe = served
    prompt = "What does `json.dumps` do?"
    expected = sft_chat_reply(task, recipe, [{"role": "user", "content": prompt}])
    done = client(url).completions.create(model="run", prompt=prompt)
    assert done.choices[0].text == expected and done.object == "text_completion"
    both = client(url).completions.create(model="run", prompt=[prompt, "Which module is that in?"])
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == expected
    streamed = client(url).completions.create(model="run", prompt=prompt, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_bad_requests_get_openai_shaped_errors(served):
    url = served[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in ("{not json", json.dumps({"model": "run"}), json.dumps({"messages": "hi"})):
        response = httpx.post(f"{url}/chat/completions", content=body, headers=headers)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and set(error) >= {"param", "code"}
    response = httpx.post(
        f"{url}/chat/completions", json={"messages": [{"role": "user", "content": 3}]}, headers=headers
    )
    assert response.status_code == 400 and "messages" in response.json()["error"]["param"]
    with pytest.raises(openai.BadRequestError, match="n=2"):
        client(url).chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}], n=2)
    ends_on_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(openai.BadRequestError, match="not a user turn"):
        client(url).chat.completions.create(model="run", messages=ends_on_answer)
    with pytest.raises(openai.NotFoundError, match="serves 'run'"):
        client(url).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(f"{url}/nowhere", headers=headers).json()["error"]["type"] == "invalid_request_error"


def test_a_wrong_or_missing_api_key_is_a_401(served):
    url = served[0]
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="run", messages=[{"role": "user", "content": "hi"}])
    response = httpx.post(f"{url}/chat/completions", content="{not json")  # refused before the body is read
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_predict_returns_what_sft_predict_writes(served, tmp_path):
    url, _, _, recipe = served
    rows = [{"messages": history, "id": number} for number, history in enumerate(histories(5))]
    source = write_jsonl(tmp_path / "rows.jsonl", rows)
    predict(recipe, Path(recipe.output.dir) / "model", str(source), tmp_path / "out.jsonl")
    response = httpx.post(f"{url}/predict", json={"rows": rows}, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == read_jsonl(tmp_path / "out.jsonl")
    bad = httpx.post(f"{url}/predict", json={"rows": [{"text": "hi"}]}, headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and "no such column in rows" in bad.json()["error"]["message"]


def test_a_classifier_serves_predict_and_refuses_chat(tmp_path):
    from fastapi.testclient import TestClient

    values = recipe_values(tmp_path, schedule={"epochs": 1}, predict={"top_k": 2})
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", values))
    commands.train(recipe, "finetune")
    rows = [{"text": "an excellent report"}, {"text": None}, {"text": "the data is broken", "label": "negative"}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    predict(recipe, tmp_path / "run" / "model", str(source), tmp_path / "out.jsonl")
    task = load_task(recipe, tmp_path / "run" / "model")
    with TestClient(build_app(task, recipe, "run")) as http:
        response = http.post("/v1/predict", json={"rows": rows})
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == read_jsonl(tmp_path / "out.jsonl")
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 400 and "/v1/predict" in refused.json()["error"]["message"]
        assert http.post("/v1/predict", json={"rows": []}).status_code == 400


def test_sft_serve_listens_on_localhost_and_stops_cleanly_on_ctrl_c(chat_run):
    tmp, _ = chat_run
    process = subprocess.Popen(
        [sys.executable, "-m", "sft_cli", "serve", str(tmp / "run"), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp,
    )
    try:
        line = ""
        while "http://" not in line and process.poll() is None:
            line = process.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        url = re.search(r"http://\S+/v1", line).group(0)
        reply = client(url, key="unused").chat.completions.create(
            model="run", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content is not None
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert "stopped" in process.stderr.read()
    finally:
        process.kill()
