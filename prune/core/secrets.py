"""Secrets never shown: :func:`redact` removes Hugging Face tokens from any text before it is printed.

It replaces the token the process can see (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, the one
``hf auth login`` stored) and anything shaped like a token (``hf_`` followed by 20 or more
letters and digits), whatever argument it was passed in.
"""

from __future__ import annotations

import os
import re

TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def known_tokens() -> list[str]:
    tokens = [os.environ.get(k) for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import get_token

        tokens.append(get_token())
    except Exception:  # noqa: BLE001 - no hub library or an unreadable token file: nothing to hide
        pass
    return [t for t in tokens if t and len(t) >= 8]


def looks_like_token(text: str) -> bool:
    return bool(TOKEN_SHAPE.search(text)) or any(t in text for t in known_tokens())


def holds_token(data: bytes) -> bool:
    """Whether the bytes of a file hold something shaped like a token, or a token this process can see."""
    return bool(re.search(TOKEN_SHAPE.pattern.encode(), data)) or any(t.encode() in data for t in known_tokens())


def redact(text: str) -> str:
    """``text`` with every token replaced by ``***``."""
    for token in known_tokens():
        text = text.replace(token, "***")
    return TOKEN_SHAPE.sub("hf_***", text)
