"""Facts about the environment sft runs in, read in one place."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE asks for the local cache only (no hub access)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
