"""`python -m sft_cli` (what torchrun and accelerate launch call)."""

from sft_cli.cli import run

run()
