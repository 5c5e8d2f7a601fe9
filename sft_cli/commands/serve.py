"""`sft serve`: a trained model behind an HTTP API — OpenAI's chat and completions for generation models, and
`/v1/predict` (what `sft predict` writes per row) for every task.

One worker thread owns the model: requests queue for it, and what has queued while it was busy is taken together,
requests with the same decoding settings decoded as one batch. A chat completion renders the conversation exactly
as `sft chat` does (ChatSession), so the same history gets the same greedy reply.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import signal
import socket
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from sft_cli.commands.chat import load_task
from sft_cli.commands.serve_worker import Channel, Job, Worker
from sft_cli.config.schema import Recipe
from sft_cli.errors import SftError
from sft_cli.model.decoding import DecodeSettings, Generated
from sft_cli.tasks.generation_infer import decode_settings
from sft_cli.tasks.specs import TASK_SPECS

log = logging.getLogger("sft")


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# -- requests ------------------------------------------------------------------------------------------------


class Message(BaseModel):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None


class Sampling(BaseModel):
    """The decoding fields chat and completions share; absent ones keep the run's `predict:` settings."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: bool = False


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[Any]] = None
    logprobs: Optional[bool] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None


class PredictRequest(BaseModel):
    rows: list[dict[str, Any]] = Field(min_length=1)


def settings_for(request: Sampling, base: DecodeSettings, max_tokens: Optional[int]) -> DecodeSettings:
    """The request's decoding: temperature 0 is greedy, above 0 samples; what it leaves out stays as the run's."""
    if request.n not in (None, 1):
        raise ApiError(400, f"n={request.n} is not supported by sft serve: one choice per request", param="n")
    changes: dict[str, Any] = {}
    if max_tokens is not None:
        changes["max_new_tokens"] = max_tokens
    if request.temperature is not None:
        changes["do_sample"] = request.temperature > 0
        changes["temperature"] = request.temperature or base.temperature
    if request.top_p is not None:
        changes["top_p"] = request.top_p
    if request.seed is not None:
        changes["seed"] = request.seed
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    changes["stop"] = tuple(s for s in stops if s)
    return replace(base, **changes)


def refuse(**fields: Any) -> None:
    """A 400 naming the first OpenAI field given that sft serve does not do."""
    for name, value in fields.items():
        if value:
            raise ApiError(400, f"{name} is not supported by sft serve", param=name)


def chat_messages(request: ChatRequest) -> list[dict[str, str]]:
    """The request's messages as {role, content} with text content ("developer" is a system message)."""
    messages = []
    for index, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in content):
                where = f"messages[{index}].content"
                raise ApiError(400, f"{where}: only text parts are supported", param=where)
            content = "\n".join(part["text"] for part in content)
        if message.role not in ("system", "developer", "user", "assistant"):
            known = "system, developer, user, assistant"
            where = f"messages[{index}].role"
            raise ApiError(400, f"{where}: '{message.role}' is not one of {known}", param=where)
        if content is None:
            raise ApiError(400, f"messages[{index}].content: missing", param=f"messages[{index}].content")
        messages.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return messages


# -- the app ---------------------------------------------------------------------------------------------------


class RequireKey:
    """ASGI middleware: every request carries `Authorization: Bearer KEY` (checked before the body is read)."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                what = "no API key" if not header else "an incorrect API key"
                response = error_response(
                    401, f"{what} — send Authorization: Bearer KEY with the server's --api-key", code="invalid_api_key"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(
    task: Any, recipe: Recipe, name: str, api_key: Optional[str] = None, on_start: Optional[Callable[[], None]] = None
) -> FastAPI:
    """The API over a task whose model is loaded (`load_task`), served as model `name`; `app.state.worker` runs
    it. `on_start` is called once the server is up."""
    worker = Worker(task, recipe)
    chats = TASK_SPECS[recipe.task].can_chat
    base = decode_settings(recipe.predict)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.thread.start()
        if on_start is not None:
            on_start()
        yield
        worker.stop()

    app = FastAPI(title="sft serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    answer_errors(app)

    def card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "sft"}

    def check_model(requested: Optional[str]) -> None:
        if requested not in (None, name):
            raise ApiError(
                404, f"model '{requested}' does not exist — this server serves '{name}'", "model", "model_not_found"
            )

    def check_chats(endpoint: str) -> None:
        if not chats:
            raise ApiError(400, f"{endpoint}: task '{recipe.task}' models do not chat — use /v1/predict")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest) -> Any:
        check_model(request.model)
        check_chats("/v1/chat/completions")
        refuse(tools=request.tools, logprobs=request.logprobs)
        settings = settings_for(request, base, request.max_completion_tokens or request.max_tokens)
        job = Job(Channel(), messages=chat_messages(request), settings=settings, stream=request.stream)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if request.stream:

            def chunk(delta: dict[str, str], finish: Optional[str]) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            def piece(text: str, finish: Optional[str]) -> dict[str, Any]:
                return chunk({} if finish else {"content": text}, finish)

            return await stream(worker, job, piece, chunk({"role": "assistant", "content": ""}, None))
        (output,) = await run(worker, [job])
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": output.text},
            "finish_reason": reason(output),
            "logprobs": None,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage([job], [output])}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest) -> Any:
        check_model(request.model)
        check_chats("/v1/completions")
        refuse(echo=request.echo, suffix=request.suffix, logprobs=request.logprobs)
        settings = settings_for(request, base, request.max_tokens)
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts or (request.stream and len(prompts) > 1):
            raise ApiError(400, "prompt: give one prompt (or, without stream, a list of them)", param="prompt")
        jobs = [
            Job(Channel(), messages=[{"role": "user", "content": p}], settings=settings, stream=request.stream)
            for p in prompts
        ]
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
        }
        if request.stream:

            def chunk(text: str, finish: Optional[str]) -> dict[str, Any]:
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

            return await stream(worker, jobs[0], chunk, None)
        outputs = await run(worker, jobs)
        choices = [
            {"index": i, "text": o.text, "logprobs": None, "finish_reason": reason(o)} for i, o in enumerate(outputs)
        ]
        return {**head, "choices": choices, "usage": usage(jobs, outputs)}

    @app.post("/v1/predict")
    async def predict(request: PredictRequest) -> dict[str, Any]:
        (predictions,) = await run(worker, [Job(Channel(), rows=request.rows)])
        return {"model": name, "predictions": predictions}

    return app


def answer_errors(app: FastAPI) -> None:
    """Every error as OpenAI shapes it: a refused or malformed request a 4xx, a bug a 500."""

    @app.exception_handler(ApiError)
    async def refused(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code)

    @app.exception_handler(SftError)
    async def unanswerable(request: Request, err: SftError) -> JSONResponse:
        return error_response(400, " ".join(str(err).split()))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", first["msg"])
            return error_response(400, f"the body is not valid JSON: {detail}")
        where = param(first.get("loc", ()))
        return error_response(400, f"{where or 'body'}: {first.get('msg')}", param=where)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(500, f"internal error: {type(err).__name__} — this is a bug in sft; please report it")


async def run(worker: Worker, jobs: list[Job]) -> list[Any]:
    """Queue the jobs and wait for their results (or the error of the first that fails)."""
    for job in jobs:
        worker.submit(job)
    return list(await asyncio.gather(*(job.channel.result() for job in jobs)))


async def stream(
    worker: Worker, job: Job, chunk: Callable[[str, Optional[str]], dict], first: Optional[dict]
) -> StreamingResponse:
    """Server-sent events: `first`, a chunk per piece of text, the finish_reason's chunk, then [DONE]."""
    worker.submit(job)
    kind, payload = await job.channel.queue.get()  # "ready", or the error that refuses the request
    if kind == "error":
        raise payload

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                kind, payload = await job.channel.queue.get()
                if kind == "text":
                    yield f"data: {json.dumps(chunk(payload, None), ensure_ascii=False)}\n\n"
                elif kind == "done":
                    yield f"data: {json.dumps(chunk('', reason(payload)))}\n\n"
                    break
                else:
                    message = " ".join(str(payload).split())
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.channel.closed = True

    return StreamingResponse(events(), media_type="text/event-stream")


FIELDS = {name for kind in (Message, ChatRequest, CompletionRequest, PredictRequest) for name in kind.model_fields}


def param(loc: tuple) -> Optional[str]:
    """A validation error's place as OpenAI names it (`messages[0].content`), less pydantic's union member names."""
    where = ""
    for part in loc[1:]:  # loc[0] is "body"
        if isinstance(part, int):
            where += f"[{part}]"
        elif part in FIELDS:
            where += f".{part}" if where else part
        else:
            break
    return where or None


def reason(output: Generated) -> str:
    """OpenAI's finish_reason: "stop" (an end-of-turn token or a stop string) or "length" (out of tokens)."""
    return "stop" if output.stopped else "length"


def usage(jobs: list[Job], outputs: list[Generated]) -> dict[str, int]:
    prompt = sum(len(job.ids) for job in jobs)
    completion = sum(len(output.ids) for output in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- the command -----------------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one), or a one-line error naming the option to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise SftError(f"--host: {host} is not an address of this machine ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise SftError(f"--port: {port} is in use on {host} — choose another --port") from None
        raise SftError(f"--host: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def serve(recipe: Recipe, model_dir: Path, run_dir: Path, host: str, port: int, api_key: Optional[str]) -> int:
    """Serve the model until Ctrl-C (a clean shutdown: requests in flight finish); returns the exit code."""
    import uvicorn

    sock = bind(host, port)
    task = load_task(recipe, model_dir)
    task.prediction_output = run_dir / "serve.predictions.jsonl"  # image-generation draws beside it
    name = run_dir.resolve().name
    where = url(sock)

    def started() -> None:
        log.info("serving %s (%s) at %s — Ctrl-C stops", name, recipe.task, where)
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no --api-key: anyone who can reach %s can use the model", host)

    app = build_app(task, recipe, name, api_key, on_start=started)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, timeout_keep_alive=5))
    stopped_by: list[int] = []

    def stop(signum: int, frame: Any) -> None:  # uvicorn shuts down cleanly, then passes the signal on to this
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        stopped_by.append(signal.SIGINT)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not stopped_by:
        return 0
    log.info("stopped")
    return 128 + stopped_by[0]
