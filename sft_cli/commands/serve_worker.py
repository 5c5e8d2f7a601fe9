"""`sft serve`'s worker: the one thread that runs the model. Requests queue for it as jobs; each time round it takes
every queued job, renders the conversations as `sft chat` does, and decodes those with the same settings as one
batch (a stream alone, token by token); `/v1/predict` rows go through `sft predict`'s own steps."""

from __future__ import annotations

import asyncio
import json
import queue
import tempfile
import threading
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sft_cli.chat.formats import InvalidConversation, check_conversation
from sft_cli.commands.chat import ChatSession
from sft_cli.commands.predict import predict_records
from sft_cli.config.schema import Recipe
from sft_cli.data.tables import DataCache
from sft_cli.errors import SftError
from sft_cli.model.decoding import DecodeSettings, first_stop, generate, stop_ids


class Channel:
    """Events from the worker to one request's event loop: ("ready", prompt tokens), ("text", a streamed piece),
    ("done", the result) or ("error", an exception)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False  # the client went away: stop generating for it

    def send(self, kind: str, payload: Any) -> None:
        """From the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop has stopped
            self.closed = True

    async def result(self) -> Any:
        """The final payload (raising the worker's exception)."""
        while True:
            kind, payload = await self.queue.get()
            if kind == "error":
                raise payload
            if kind == "done":
                return payload


@dataclass
class Job:
    """One request's work: a conversation to answer (streamed or not), or rows to predict."""

    channel: Channel
    messages: Optional[list[dict[str, str]]] = None
    settings: Optional[DecodeSettings] = None
    stream: bool = False
    rows: Optional[list[dict[str, Any]]] = None
    ids: list[int] = field(default_factory=list)


class Gone(Exception):
    """The streaming client disconnected."""


class Deltas:
    """A `generate` streamer that sends the reply as it grows: never past a stop token or string, never a broken
    character, and never trailing whitespace (the finished reply is stripped), so the pieces join to its text."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...], channel: Channel):
        self.tokenizer, self.stops, self.channel = tokenizer, stops, channel
        self.stop_ids = set(stop_ids(tokenizer))
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.channel.closed:
            raise Gone()
        if not self.prompt_seen:  # the first call is the prompt (a decoder's) or the start token (seq2seq)
            self.prompt_seen = True
            return
        self.ids += value.reshape(-1).tolist()
        cut = next((i for i, t in enumerate(self.ids) if t in self.stop_ids), len(self.ids))
        text = self.tokenizer.decode(self.ids[:cut], skip_special_tokens=True).lstrip()
        found = first_stop(text, self.stops)
        if found is not None:
            text = text[:found]
        elif self.stops:  # the end might be the start of a stop string
            text = text[: len(text) - max(len(s) for s in self.stops) + 1]
        text = text.rstrip().rstrip("\ufffd")
        self.send(text)

    def send(self, text: str) -> None:
        """Send what `text` adds to what was sent."""
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.channel.send("text", text[len(self.sent) :])
            self.sent = text

    def end(self) -> None:
        pass


class Worker:
    """The one thread that runs the model: takes every queued job, renders prompts, decodes batches."""

    def __init__(self, task: Any, recipe: Recipe):
        self.task, self.recipe = task, recipe
        self.inbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self.run, name="sft-serve-worker", daemon=True)
        self.generate_calls = 0  # `generate` calls so far, and the largest batch one decoded (tests read them)
        self.largest_batch = 0

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def run(self) -> None:
        while True:
            jobs = [self.inbox.get()]
            while not self.inbox.empty():
                jobs.append(self.inbox.get_nowait())
            with torch.inference_mode():
                for group in self.plan([job for job in jobs if job is not None]):
                    self.attempt(group)
            if None in jobs:
                return

    def plan(self, jobs: list[Job]) -> list[list[Job]]:
        """Groups to run, in arrival order: each prediction and each stream alone, other conversations batched
        with those of the same decoding settings (a seeded sample alone, so its seed reproduces it)."""
        groups: dict[Any, list[Job]] = {}
        for number, job in enumerate(jobs):
            if job.rows is None and not self.attempt([job], self.prepare):
                continue
            seeded = job.rows is None and job.settings.do_sample and job.settings.seed is not None
            batched = job.rows is None and not job.stream and not seeded
            key = astuple(job.settings) if batched else number
            groups.setdefault(key, []).append(job)
        size = max(1, self.recipe.predict.batch_size)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)]

    def attempt(self, group: list[Job], action: Optional[Callable[[list[Job]], None]] = None) -> bool:
        """Run the group's work; a failure goes to each of its requests. False when it failed."""
        try:
            (action or self.execute)(group)
            return True
        except Gone:
            return False
        except Exception as err:  # the request's error (SftError: a 400) or a bug (a 500), not the server's end
            for job in group:
                job.channel.send("error", err)
            return False

    def prepare(self, group: list[Job]) -> None:
        """Render the conversation as `sft chat` does: its template, the oldest turns dropped to fit the context."""
        job = group[0]
        session = ChatSession(self.task, self.recipe)
        turns = job.messages
        if turns[0]["role"] == "system":
            session.system, turns = turns[0]["content"], turns[1:]
        session.turns = list(turns)
        try:
            check_conversation(job.messages, prompt=True)
            job.ids, room = session.prompt(job.settings.max_new_tokens)
        except InvalidConversation as err:
            raise SftError(f"messages: {err}") from None
        job.settings = replace(job.settings, max_new_tokens=room)
        job.channel.send("ready", len(job.ids))

    def execute(self, group: list[Job]) -> None:
        first = group[0]
        if first.rows is not None:
            first.channel.send("done", self.predict(first.rows))
            return
        streamer = Deltas(self.task.tokenizer, first.settings.stop, first.channel) if first.stream else None
        if first.settings.num_beams > 1:
            streamer = None  # beam search cannot stream: the reply comes as one piece
        outputs = generate(self.task.model, self.task.tokenizer, [job.ids for job in group], first.settings, streamer)
        self.generate_calls += 1
        self.largest_batch = max(self.largest_batch, len(group))
        if first.stream:
            (streamer or Deltas(self.task.tokenizer, (), first.channel)).send(outputs[0].text)
        for job, output in zip(group, outputs):
            job.channel.send("done", output)

    def _absolute_paths(self, row: dict[str, Any]) -> dict[str, Any]:
        """Image and audio paths relative to the server's working directory (an input file's are relative to it)."""
        row = dict(row)
        for column in (self.recipe.data.image_field, self.recipe.data.audio_field):
            value = row.get(column)
            if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                row[column] = str(Path.cwd() / value)
        return row

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`sft predict` on these rows: read as an input file is, checked, predicted in batches."""
        settings = self.recipe.predict
        rows = [self._absolute_paths(row) for row in rows]
        with tempfile.TemporaryDirectory(prefix="sft-serve-") as tmp:
            path = Path(tmp) / "rows.jsonl"
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
            cache, self.task.data_cache = self.task.data_cache, DataCache(directory=tmp)
            try:
                table = self.task.prediction_table(str(path))
                self.task.check_input(table.column_names)
                columns = table[:]
                records = [dict(zip(columns, values)) for values in zip(*columns.values())]
                if settings.do_sample:
                    torch.manual_seed(self.recipe.engine.seed if settings.seed is None else settings.seed)
                return predict_records(self.task, self.task.model, records, 1, settings)
            except SftError as err:
                message = str(err).replace(str(path), "the rows").replace("--input row", "row")
                raise SftError(message.replace("--input", "rows")) from None
            finally:
                self.task.data_cache = cache
