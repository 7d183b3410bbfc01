"""Finders of secrets for the redactor (:mod:`monitor.service.redaction`, kind ``secret``).

Vendor keys and tokens by their known prefixes, JWTs and PEM private key blocks, the credential
after ``Bearer``/``Basic``, the password of a URL with credentials, AWS secret access keys after
their name, and the literal value of assignments whose name ends in a secret word. There is no
entropy guessing: a secret needs a known prefix, a scheme, an armour line or a telling name, and
an assignment's value must be a literal, not a reference, placeholder or prose (the module
docstring of :mod:`monitor.service.redaction` lists what counts and what does not).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_TOKEN_BODIES = [
    # OpenAI/Anthropic-style keys; the digit keeps words like "sk-learn-style" out.
    r"\bsk-(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}",
    # Stripe-style secret and restricted keys.
    r"\b[rs]k_(?:live|test)_[A-Za-z0-9]{10,}",
    # AWS access key ids (the secret access key needs its name, see the assignments).
    r"\b(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}\b",
    # GitHub tokens: classic (ghp_, gho_, ghu_, ghs_, ghr_) and fine-grained.
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{20,}",
    # Slack bot/user/app/admin tokens.
    r"\bxox[bpas]-[A-Za-z0-9-]{10,}",
    # Google API keys.
    r"\bAIza[A-Za-z0-9_-]{35}",
    # JWTs: base64url JSON header and payload (both start "{" -> "eyJ"), optional signature.
    r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]+)?",
    # PEM private keys: the whole armoured block; a block cut off before its END line is
    # redacted through its last base64 line.
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
    r"|(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/=:, -]{16,})*)",
]
# One pass over the text for all of them.
_TOKEN_RE = re.compile("|".join(f"(?:{body})" for body in _TOKEN_BODIES))

# The credential after an HTTP auth scheme; the scheme word stays.
_AUTH_SCHEME_RE = re.compile(r"(?i:\b(?:bearer|basic)[ \t]+)(?P<v>[A-Za-z0-9._~+/-]{8,}=*)")

# The password of a URL with credentials: scheme://user:password@host.
_URL_PASSWORD_RE = re.compile(
    r"\b[A-Za-z][A-Za-z0-9+.-]{0,30}://[^\s/:@]{1,256}:(?P<v>[^\s/@]{1,256})@"
)

_SECRET_NAME = (
    r"(?:pass(?:word|wd|phrase)|pwd|secret|token|credentials?|apikey"
    r"|(?:api|access|secret|private|signing|encryption|master|client|account)[_-]?key)"
)
# NAME = VALUE / NAME: VALUE / "NAME": "VALUE" / NAME => VALUE. The name must end in a secret
# word (so max_tokens and token_count do not count); only the value is redacted.
_ASSIGNMENT_RE = re.compile(
    r"(?<![\w.\]-])[A-Za-z0-9_.-]{0,64}?" + _SECRET_NAME + r"\b"
    r"""(?:\\?["'])?[ \t]*(?P<sep>=>|:=|[:=](?!=))[ \t]*"""
    r"""(?:\\?"(?P<dq>(?:[^"\n\\]|\\(?!"))*)\\?"|\\?'(?P<sq>(?:[^'\n\\]|\\(?!'))*)\\?'"""
    # A bare value ends at a space, quote, comma or semicolon, and at an "&" only where a
    # query string goes on ("?api_key=abc&page=2"): in "DB_PASSWORD=Tr0ub4dor&3xyz" it is
    # part of the password.
    r"""|(?P<bare>(?![<\[\\{(])(?:[^\s'"`,;&]|&(?![A-Za-z_][\w.\[\]-]*=))++))""",
    re.IGNORECASE,
)

# AWS secret access keys: 40 base64 characters after their name, also where a space rather
# than "=" separates them (``aws configure set aws_secret_access_key KEY``,
# ``--aws-secret-access-key KEY``).
_AWS_SECRET_RE = re.compile(
    r"(?i:\baws[_-]?secret[_-]?access[_-]?key)[\"']?"
    r"(?:[ \t]*(?:=>|:=|[:=])[ \t]*|[ \t]+)[\"']?(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
)

_SECRET_WORD_RE = re.compile(r"pass|pwd|secret|token|key|credential", re.IGNORECASE)
_NOT_LITERAL = {
    "none",
    "null",
    "nil",
    "undefined",
    "true",
    "false",
    "str",
    "string",
    "bytes",
    "int",
    "secretstr",
    "optional",
    "any",
    "required",
}
# Values that refer to a secret held elsewhere or stand in for one.
_REFERENCE_RE = re.compile(
    r"""\$\{?[A-Za-z_]\w*\}?|\$\(.*|\{\{.*|\{[A-Za-z_]\w*\}|<.*>|%\(?\w*\)?s"""
    r"""|[*xX.…]+|-+"""
)
# Code, not a literal: a dotted name, or a call or subscript on a name whose argument is a
# name, a string (the value stops at its quote: os.environ[, os.getenv() or nothing
# (get_secret()). A literal such as Summer(2024) is not code.
_CODE_RE = re.compile(
    r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+|[A-Za-z_][\w.]*[\[(](?:[A-Za-z_][\w.]*)?[\])]*"
)


def _looks_generated(value: str) -> bool:
    return (
        len(value) >= 16
        and any(c.isdigit() for c in value)
        and any(c.isupper() for c in value)
        and any(c.islower() for c in value)
    )


def _is_literal(value: str, *, bare: bool, colon: bool) -> bool:
    """Whether an assignment's value is a literal secret rather than a reference or prose."""
    if not value or value.lower() in _NOT_LITERAL or _REFERENCE_RE.fullmatch(value):
        return False
    if not bare:
        return True
    if _CODE_RE.fullmatch(value):
        return False
    # An identifier that names a secret is a reference or placeholder (API_KEY, YOUR_TOKEN),
    # unless it looks generated: long, with digits and both cases (an AWS secret key can read
    # "...EXAMPLEKEY" and still be one).
    if (
        re.fullmatch(r"[A-Za-z_][\w-]*", value)
        and _SECRET_WORD_RE.search(value)
        and not _looks_generated(value)
    ):
        return False
    # After a colon, a bare run of letters is usually prose ("Password: see below").
    return not (colon and value.isalpha())


def _assignment_values(text: str) -> Iterator[tuple[int, int]]:
    for m in _ASSIGNMENT_RE.finditer(text):
        group = next(g for g in ("dq", "sq", "bare") if m.group(g) is not None)
        start, end = m.span(group)
        if group == "bare":
            # Prose punctuation after an unquoted value is not part of it: a full stop, or a
            # closing parenthesis the value did not open ("(password=hunter2)").
            while end > start and (
                text[end - 1] == "."
                or (
                    text[end - 1] == ")"
                    and text.count(")", start, end) > text.count("(", start, end)
                )
            ):
                end -= 1
        colon = m.group("sep") == ":"
        if _is_literal(text[start:end], bare=group == "bare", colon=colon):
            yield start, end


def find_secrets(text: str) -> Iterator[tuple[int, int]]:
    """Candidate (start, end) spans of secrets in ``text``, in any order; they may overlap."""
    for m in _TOKEN_RE.finditer(text):
        yield m.span()
    for m in _AUTH_SCHEME_RE.finditer(text):
        value = m.group("v")
        # Opaque credentials carry a digit or are long; "Bearer instruments" is English.
        if re.search(r"\d", value) or len(value) >= 20:
            yield m.span("v")
    for m in _URL_PASSWORD_RE.finditer(text):
        yield m.span("v")
    for m in _AWS_SECRET_RE.finditer(text):
        yield m.span("v")
    yield from _assignment_values(text)
