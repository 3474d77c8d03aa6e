"""Is the Hugging Face hub reachable? Asked once, quickly, before anything is downloaded."""

from __future__ import annotations

import os
import socket

__all__ = ["offline_requested", "hub_reachable"]

_HUB_HOST = ("huggingface.co", 443)


def offline_requested() -> bool:
    """True when the user set HF_HUB_OFFLINE or HF_DATASETS_OFFLINE."""
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
               for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub succeeds within `timeout` seconds (and offline is not requested)."""
    if offline_requested():
        return False
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False
