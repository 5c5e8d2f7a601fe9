"""`sft chat`: talk to a trained generation model, history kept, with the template it was trained with.

On a terminal, replies stream token by token and `/reset`, `/system TEXT`, `/save FILE`, `/exit` work.
Without one (a pipe, a script, a test), each stdin line is a user turn and each reply is one stdout line
(newlines inside a reply are written as the two characters `\\n`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, TextIO

import torch

from sft_cli.config.schema import Recipe
from sft_cli.engine.accelerator import make_accelerator
from sft_cli.errors import SftError
from sft_cli.model import backbone as bb
from sft_cli.model.decoding import generate
from sft_cli.tasks.registry import build_task
from sft_cli.tasks.specs import TASK_SPECS

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

    def messages(self, turns: Optional[list[dict[str, str]]] = None) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + (self.turns if turns is None else turns)

    def prompt(self, wanted: Optional[int] = None) -> tuple[list[int], int]:
        """(the conversation with the generation prompt, tokens left to generate) within the model's context.

        `wanted` tokens to generate (default predict.max_new_tokens) are budgeted: the oldest exchanges go first;
        when the newest message alone leaves no room, it is refused.
        """
        wanted, turns = wanted or self.recipe.predict.max_new_tokens, self.turns
        while True:
            ids = self.task.prompt_ids(self.messages(turns))
            if len(ids) + wanted <= self.context or len(turns) <= 1:
                break
            turns = turns[2:]
        if len(ids) >= self.context:
            self.turns = self.turns[:-1]  # the history stays as it was
            raise SftError(
                f"your message is {len(ids):,} tokens with the template and the model's context holds "
                f"{self.context:,} — send a shorter one"
            )
        self.turns = turns
        return ids, min(wanted, self.context - len(ids))

    def reply(self, text: str, streamer: Any = None) -> str:
        """Add a user turn, generate the assistant's answer (streamed when asked), keep both."""
        from sft_cli.chat.formats import InvalidConversation
        from sft_cli.tasks.generation_infer import decode_settings

        self.turns.append({"role": "user", "content": text})
        try:
            ids, room = self.prompt()
        except InvalidConversation as err:
            self.turns = self.turns[:-1]
            raise SftError(f"this message cannot be sent: {err}") from None
        settings = replace(decode_settings(self.recipe.predict), max_new_tokens=room)
        with torch.inference_mode():
            answer = generate(self.task.model, self.task.tokenizer, [ids], settings, streamer)[0]
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
                target = Path(argument.strip()).expanduser()
                try:
                    with open(target, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"messages": self.messages()}, ensure_ascii=False) + "\n")
                except OSError as err:
                    out.write(f"(could not save to {target}: {err.strerror or err} — the conversation goes on)\n")
                else:
                    out.write(f"(saved to {target})\n")
        else:
            out.write(HELP + "\n")
        out.flush()
        return True


def load_task(recipe: Recipe, model_dir: Path) -> Any:
    """The recipe's task with its trained model loaded for inference, on the device, in eval mode."""
    accelerator = make_accelerator(recipe.engine, training=False)
    task = build_task(recipe)
    task.load_for_inference(str(model_dir))
    task.model = accelerator.prepare_model(task.model, evaluation_mode=True).eval()
    return task


def chat(recipe: Recipe, model_dir: Path, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """Run the conversation loop until /exit or end of input; returns the number of replies."""
    if not TASK_SPECS[recipe.task].can_chat:
        chatting = " or ".join(name for name, spec in TASK_SPECS.items() if spec.can_chat)
        raise SftError(
            f"task: '{recipe.task}' models do not chat — use `sft predict` (sft chat needs task: {chatting})"
        )
    task = load_task(recipe, model_dir)
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
        try:
            if interactive:
                from transformers import TextStreamer

                stdout.write("assistant> ")
                stdout.flush()
                session.reply(line, TextStreamer(task.tokenizer, skip_prompt=True, skip_special_tokens=True))
            else:
                stdout.write(session.reply(line).replace("\n", "\\n") + "\n")
                stdout.flush()
        except SftError as err:  # this message cannot be answered; the conversation goes on
            sys.stderr.write(f"error: {err}\n")
            if not interactive:
                stdout.write("\n")  # still one stdout line per stdin line
                stdout.flush()
            continue
        replies += 1
    return replies
