"""`sft chat`: talk to a trained generation model, history kept, with the template it was trained with.

On a terminal, replies stream token by token and `/reset`, `/system TEXT`, `/save FILE`, `/exit` work.
Without one (a pipe, a script, a test), each stdin line is a user turn and each reply is one stdout line
(newlines inside a reply are written as the two characters `\\n`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from sft_cli import backbone as bb
from sft_cli.device import make_accelerator
from sft_cli.errors import SftError
from sft_cli.generate import generate
from sft_cli.schema import Recipe
from sft_cli.tasks import build_task

HELP = "commands: /reset (forget the conversation), /system TEXT, /save FILE, /exit"


class ChatSession:
    """A conversation with a model: the messages so far, and how to extend them by one reply."""

    def __init__(self, task: Any, recipe: Recipe):
        self.task = task
        self.recipe = recipe
        self.system: Optional[str] = None
        self.turns: list[dict[str, str]] = []
        model = bb.unwrap(task.model)
        config = model.config
        self.context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def prompt(self) -> list[int]:
        """The conversation with the generation prompt; the oldest exchanges go when it would not fit."""
        room = self.context - self.recipe.predict.max_new_tokens
        while True:
            ids = self.task.prompt_ids(self.messages())
            if len(ids) <= room or len(self.turns) <= 1:
                return ids[-room:]
            self.turns = self.turns[2:]

    def reply(self, text: str, streamer: Any = None) -> str:
        """Add a user turn, generate the assistant's answer (streamed when asked), keep both."""
        from sft_cli.tasks.generation_infer import decode_settings

        self.turns.append({"role": "user", "content": text})
        with torch.inference_mode():
            answer = generate(
                self.task.model, self.task.tokenizer, [self.prompt()], decode_settings(self.recipe.predict), streamer
            )[0]
        self.turns.append({"role": "assistant", "content": answer.text})
        return answer.text

    def command(self, line: str, out: TextIO) -> bool:
        """Run a /command; False means exit."""
        name, _, argument = line.partition(" ")
        if name == "/exit":
            return False
        if name == "/reset":
            self.turns = []
            out.write("(conversation reset)\n")
        elif name == "/system":
            self.system = argument.strip() or None
            self.turns = []
            out.write("(system prompt set; conversation reset)\n" if self.system else "(system prompt cleared)\n")
        elif name == "/save":
            if not argument.strip():
                out.write("usage: /save FILE\n")
            else:
                with open(Path(argument.strip()).expanduser(), "a", encoding="utf-8") as f:
                    f.write(json.dumps({"messages": self.messages()}, ensure_ascii=False) + "\n")
                out.write(f"(saved to {argument.strip()})\n")
        else:
            out.write(HELP + "\n")
        out.flush()
        return True


def chat(recipe: Recipe, model_dir: Path, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Run the conversation loop until /exit or end of input; returns the number of replies."""
    if recipe.task != "generation":
        raise SftError(
            f"task: '{recipe.task}' models do not chat — use `sft predict` (sft chat needs task: generation)"
        )
    accelerator = make_accelerator(recipe.engine, training=False)
    task = build_task(recipe)
    task.load_for_inference(str(model_dir))
    task.model = accelerator.prepare_model(task.model, evaluation_mode=True).eval()
    session = ChatSession(task, recipe)
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        stdout.write(f"chatting with {model_dir} — {HELP}\n")
    replies = 0
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.startswith("/"):
            if not session.command(line, stdout if interactive else sys.stderr):
                break
            continue
        if not line.strip():
            continue
        if interactive:
            from transformers import TextStreamer

            stdout.write("assistant> ")
            stdout.flush()
            session.reply(line, TextStreamer(task.tokenizer, skip_prompt=True, skip_special_tokens=True))
        else:
            stdout.write(session.reply(line).replace("\n", "\\n") + "\n")
            stdout.flush()
        replies += 1
    return replies
