"""The OpenAI API's error body, as the guard proxy and serve-model answer with it (what the
OpenAI SDKs turn into their exception types)."""

from __future__ import annotations

from typing import Any


def openai_error(
    message: str, code: str | None, param: str | None = None, **extra: Any
) -> dict[str, Any]:
    """``{"error": {message, type, code, param, ...}}``; ``extra`` may override ``type``."""
    error = {"message": message, "type": "invalid_request_error", "code": code, "param": param}
    return {"error": {**error, **extra}}
