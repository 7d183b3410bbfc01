"""What the database can hold, checked where input enters (HTTP bodies and parameters, Kafka).

PostgreSQL text cannot hold NUL (U+0000), and no back-end can encode a lone UTF-16 surrogate
(U+D800-U+DFFF, which JSON's ``"\\ud800"`` decodes to in Python); a stored JSON document that
holds either breaks every later JSON operator on its row. Non-finite numbers (``NaN``,
``Infinity``, which Python's JSON parser accepts) are not JSON at all. Refusing such input at
the boundary (HTTP 422 naming the field, the Kafka dead-letter topic) keeps it from failing
deep inside a transaction, or worse, from being stored.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BeforeValidator, ValidationInfo

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
MAX_DEPTH = 32  # metadata nesting: far beyond real use, far below any recursion limit


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    char, at = found.group(), found.start()
    if char == "\x00":
        return f"contains a NUL character (U+0000) at position {at}, which cannot be stored"
    return f"contains a lone surrogate (U+{ord(char):04X}) at position {at}, which is not text"


def storable_text(text: Any) -> Any:
    """A pydantic validator: ``text`` unchanged, or ValueError saying what is wrong.

    It runs before pydantic's own string check, which refuses a lone surrogate in a length-
    limited field without saying which character (a non-string is left to that check)."""
    problem = text_problem(text) if isinstance(text, str) else None
    if problem is not None:
        raise ValueError(problem)
    return text


StorableStr = Annotated[str, BeforeValidator(storable_text)]


def json_problem(value: Any, root: str = "value") -> str | None:
    """Where (``root['key'][0]``) and why a JSON-like value cannot be stored, or None.

    Iterative, so a deeply nested document cannot exhaust the stack here; refused past
    ``MAX_DEPTH`` levels so that it cannot do so later (redaction, serialisation).
    """
    stack: list[tuple[str, Any, int]] = [(root, value, 0)]
    while stack:
        path, item, depth = stack.pop()
        if depth > MAX_DEPTH and isinstance(item, dict | list | tuple):
            return f"{path} is nested deeper than {MAX_DEPTH} levels"
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                return f"{path} {problem}"
        elif isinstance(item, float) and not math.isfinite(item):
            return f"{path} is not a finite number (NaN or Infinity), which JSON cannot hold"
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                problem = text_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    return f"key {key!r} in {path} {problem}"
                stack.append((f"{path}[{key!r}]", child, depth + 1))
        elif isinstance(item, list | tuple):
            items = reversed(list(enumerate(item)))
            stack.extend((f"{path}[{i}]", child, depth + 1) for i, child in items)
    return None


def storable_json(value: Any, info: ValidationInfo) -> Any:
    """A pydantic validator for free-form JSON fields (metadata)."""
    problem = json_problem(value, info.field_name or "value")
    if problem is not None:
        raise ValueError(problem)
    return value


def check_parameters(request: Request) -> None:
    """An app-wide dependency: query parameters (names and values) and path parameters must
    be storable text too; 422 naming each one that is not."""
    errors: list[dict[str, Any]] = []
    for name, value in request.query_params.multi_items():
        problem = text_problem(name) or text_problem(value)
        if problem is not None:
            errors.append(_error("query", name, problem))
    for name, value in request.path_params.items():
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            errors.append(_error("path", name, problem))
    if errors:
        raise RequestValidationError(errors)


def _error(where: str, name: str, problem: str) -> dict[str, Any]:
    return {"loc": [where, name], "type": "value_error", "msg": f"Value error, {problem}"}
