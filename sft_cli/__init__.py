"""sft: turn a YAML recipe into a trained, evaluated model."""

__version__ = "0.1.0"
