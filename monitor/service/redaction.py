"""Redaction of personal data and secrets before a conversation is stored.

The service runs the detectors on the real text first and only then redacts what it keeps for
audit, so detectors never see placeholders. Each finding is replaced by a typed placeholder:

==========  ============  ==================================================================
kind        placeholder   what counts
==========  ============  ==================================================================
``secret``  ``[SECRET]``  vendor keys and tokens (``sk-``/``sk_live_``-style keys, AWS access
                          key ids ``AKIA...``, GitHub ``ghp_...``/``github_pat_...``, Slack
                          ``xox[bpas]-...``, Google ``AIza...``), JWTs, the credential after
                          ``Bearer``/``Basic``, PEM private key blocks, the password in
                          ``scheme://user:password@host``, and the *value* of assignments whose
                          name ends in password/passwd/passphrase/pwd/secret/token/credential(s)
                          or an api/access/secret/private/signing/... key (``DB_PASSWORD=...``,
                          ``"api_key": "..."``, ``X-Api-Key: ...``); the name stays. A bare
                          value runs to a space, quote, comma or semicolon, and past an ``&``
                          unless a query string goes on (``&page=2``). AWS secret access keys
                          after their name also when only a space separates them.
``card``    ``[CARD]``    13-19 digits, bare or in groups split by one kind of separator
                          (space or dash, first group of 4), starting with 2-6 (the major
                          networks) and passing the Luhn check.
``email``   ``[EMAIL]``   ``local@domain.tld``: a dotted domain ending in an alphabetic TLD.
``ip``      ``[IP]``      IPv4 dotted quads and IPv6 addresses that :mod:`ipaddress` accepts.
``phone``   ``[PHONE]``   North American numbers (``415-555-0132``, ``(415) 555-0132``,
                          ``+1 415 555 0132``, a bare ``4155550132``), international numbers
                          with ``+`` or ``00`` (8-15 digits), and grouped national numbers that
                          start with a trunk ``0`` (``020 7946 0958``, 10-12 digits).
==========  ============  ==================================================================

Deliberately *not* redacted (near misses that look like the above but carry nothing personal):

* numbers that fail a check: a 16-digit order id that fails Luhn, ISBNs, dates ``2024-11-21``,
  times ``12:30:45``, year ranges ``1999-2024``, prices, numbers shorter than a phone number
  (a 7-digit local ``555-0132`` included), zero-padded ids, Unix timestamps;
* dotted numbers that are not addresses: versions ``v2.13.0``/``v1.2.3.4`` (a prefix glued to
  the number), three-part ``10.0.0``, out-of-range ``999.1.1.1``, longer OIDs ``1.3.6.1.4.1``;
  short colon runs such as Python slices ``x[1::2]``, MAC addresses and times;
* addresses that identify no host: loopback (``127.0.0.1``, ``::1``), unspecified
  (``0.0.0.0``, ``::``) and the reserved IPv4 block ``240.0.0.0/4`` (netmasks such as
  ``255.255.255.0``, broadcast); a bare ``1.2.3.4`` *is* a valid address and is redacted;
* ``user@localhost`` and other addresses without a dotted domain, ``@mentions``, decorators
  such as ``@app.get``;
* high-entropy strings on their own: git SHAs, UUIDs and hashes are not secrets by themselves
  (there is no entropy guessing); a secret needs a known prefix, a ``Bearer``/``Basic`` scheme,
  a PEM armour line or a telling name;
* assignments whose value is not a literal: references (``os.environ["API_KEY"]``,
  ``os.getenv(...)``, ``settings.api_key``, ``process.env.TOKEN``, ``$TOKEN``, ``${TOKEN}``,
  ``{{ secrets.TOKEN }}``), placeholders (``<your-key>``, ``***``, ``YOUR_API_KEY``), ``None``/
  ``null``/booleans, type annotations (``password: str``), empty values (an identifier-like
  value that names a secret counts as a placeholder unless it looks generated: 16 characters
  or more with digits and both cases); names that merely
  contain a secret word (``max_tokens``, ``token_count``, ``password_hash``); the word
  ``password`` with no value; prose such as "my password is hunter2"; after a ``:`` an unquoted
  value made only of letters ("Password: click the link") is taken for prose;
* spelled-out or obfuscated forms ("john at example dot com"), names and postal addresses;
  certificates and public keys.

Accepted over-redaction: a bare 10-digit id that fits the North American plan (area code and
exchange starting 2-9) reads as a phone; an id of 13-19 digits that starts with 2-6 and
happens to pass Luhn reads as a card; SSH remotes such as ``git@github.com`` read as e-mail
addresses; a four-part version written bare (``1.2.3.4``) reads as an address.

Identifiers (conversation ids, metadata keys) go through ``redact_identifier``: the findings
are replaced as in text and a digest of the original is appended, so two ids that redact alike
stay apart.

On overlap the higher-priority kind wins (secret > card > email > ip > phone: the more precise
check first); within a kind the earlier, then the longer candidate wins. Spans are character
offsets into the original text, non-overlapping and sorted. The placeholders themselves are
never matched, so redacting redacted text changes nothing.

This is the standard library only (``re`` and ``ipaddress``): no well-kept library does typed
PII redaction with a Luhn check without pulling in heavy NLP models, and the rules here are
small enough to read and test.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

KINDS = ("email", "phone", "card", "ip", "secret")
PLACEHOLDERS = {kind: f"[{kind.upper()}]" for kind in KINDS}
# Highest priority first: a candidate is kept only where no earlier kind already matched.
PRIORITY = ("secret", "card", "email", "ip", "phone")

_PLACEHOLDER_RE = re.compile(r"\[(?:EMAIL|PHONE|CARD|IP|SECRET)\]")


@dataclass(frozen=True)
class Span:
    """Characters ``text[start:end]`` are a finding of ``kind``."""

    start: int
    end: int
    kind: str


# A finder yields candidate (start, end) pairs for one kind, in any order; they may overlap.
_Finder = Callable[[str], Iterator[tuple[int, int]]]


def _overlapping(body: str) -> re.Pattern[str]:
    """A pattern that reports a match of ``body`` (group 1) at every position, overlaps included.

    Number patterns scan this way so that a longer run that fails its check does not hide a
    valid number starting inside it.
    """
    return re.compile(f"(?=({body}))")


def _space_prefixes(text: str, start: int, end: int) -> Iterator[int]:
    """``end`` and the ends of the prefixes of ``text[start:end]`` that stop before a space."""
    yield end
    pos = end
    while (pos := text.rfind(" ", start, pos)) > start:
        yield pos


# --- secrets --------------------------------------------------------------------------------

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


def _secrets(text: str) -> Iterator[tuple[int, int]]:
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


# --- payment cards --------------------------------------------------------------------------

# Number edges: not glued to a word or to a longer dotted/dashed number. A placeholder's
# brackets count as part of a word there, so that redacting twice finds nothing new.
_CARD_RE = _overlapping(
    r"(?<![\w+])(?<![\w\]][.-])"
    r"\d{4}(?P<s>[ -]?)\d{4,6}(?:(?P=s)\d{3,6}){1,3}"
    r"(?!\w)(?![.-][\d\[])"
)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and _luhn_ok(digits)


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD_RE.finditer(text):
        start, end = m.span(1)
        for stop in _space_prefixes(text, start, end):
            if _is_card(text[start:stop]):
                yield start, stop


# --- e-mail addresses -----------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.+%-])"
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\b(?!-)"
)


def _emails(text: str) -> Iterator[tuple[int, int]]:
    if "@" in text:
        for m in _EMAIL_RE.finditer(text):
            yield m.span()


# --- IP addresses ---------------------------------------------------------------------------

_IPV4_RE = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w)(?!\.\d)")
_IPV6_RE = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
    r"(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?"
    r"(?![\w:])(?!\.\d)"
)


def _is_ipv4(candidate: str) -> bool:
    # Normalise leading zeros (ipaddress rejects "010"); any octet over 255 fails here.
    try:
        address = ipaddress.IPv4Address(".".join(str(int(p)) for p in candidate.split(".")))
    except ipaddress.AddressValueError:
        return False
    return not (address.is_loopback or address.is_unspecified or address.is_reserved)


def _is_ipv6(candidate: str) -> bool:
    try:
        address = ipaddress.IPv6Address(candidate)
    except ipaddress.AddressValueError:
        return False
    if address.is_loopback or address.is_unspecified:
        return False
    if "." in candidate:  # embedded IPv4, e.g. ::ffff:192.0.2.1
        return True
    groups = [g for g in candidate.split(":") if g]
    hex_digits = sum(len(g) for g in groups)
    # Slices (x[1::2]) and C++/Rust paths (Face::Bead) parse as IPv6; real ones are longer and
    # nearly always carry a decimal digit.
    return len(groups) >= 2 and hex_digits >= 5 and any(c.isdigit() for c in candidate)


def _ips(text: str) -> Iterator[tuple[int, int]]:
    if not any(c.isdigit() for c in text):
        return
    for m in _IPV4_RE.finditer(text):
        if _is_ipv4(m.group()):
            yield m.span()
    if "::" in text or text.count(":") >= 7:
        for m in _IPV6_RE.finditer(text):
            if _is_ipv6(m.group()):
                yield m.span()


# --- phone numbers --------------------------------------------------------------------------

_PHONE_LEFT = r"(?<![\w+@#/$\]])(?<![\w\]][.-])"
_PHONE_RIGHT = r"(?![\w@\[])(?![.-][\d\[])"
# North American: area code and exchange start 2-9; 3-3-4 with any one separator each.
_NANP_RE = _overlapping(
    _PHONE_LEFT
    + r"(?:\+?1[ .-]?)?(?:\([2-9]\d\d\)[ ]?|[2-9]\d\d[ .-]?)[2-9]\d\d[ .-]?\d{4}"
    + _PHONE_RIGHT
)
# International: + or 00, a country code, then groups (an area code may be in parentheses).
_INTL_RE = _overlapping(
    _PHONE_LEFT
    + r"(?:\+|00(?=[1-9]))[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,6})){1,6}"
    + _PHONE_RIGHT
)
# National with a trunk 0, grouped by one kind of separator (a bare 0-run is an id).
_TRUNK_RE = _overlapping(
    _PHONE_LEFT + r"0[1-9]\d{0,3}(?P<s>[ .-])\d{2,8}(?:(?P=s)\d{2,8}){0,3}" + _PHONE_RIGHT
)


def _digit_count(candidate: str) -> int:
    return sum(c.isdigit() for c in candidate)


def _phones(text: str) -> Iterator[tuple[int, int]]:
    for m in _NANP_RE.finditer(text):
        yield m.span(1)
    for m in _INTL_RE.finditer(text):
        start, end = m.span(1)
        for stop in _space_prefixes(text, start, end):
            candidate = text[start:stop]
            n = _digit_count(candidate) - (2 if candidate.startswith("00") else 0)
            if 8 <= n <= 15:
                yield start, stop
    for m in _TRUNK_RE.finditer(text):
        start, end = m.span(1)
        for stop in _space_prefixes(text, start, end):
            if 10 <= _digit_count(text[start:stop]) <= 12:
                yield start, stop


_FINDERS: dict[str, _Finder] = {
    "secret": _secrets,
    "card": _cards,
    "email": _emails,
    "ip": _ips,
    "phone": _phones,
}


class _Taken:
    """Disjoint character ranges already claimed, kept sorted for overlap tests."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []

    def add(self, start: int, end: int) -> bool:
        """Claim ``[start, end)`` unless it overlaps a claimed range; say whether it was."""
        lo, hi = 0, len(self._ranges)
        while lo < hi:  # first range that ends after start
            mid = (lo + hi) // 2
            if self._ranges[mid][1] <= start:
                lo = mid + 1
            else:
                hi = mid
        if lo < len(self._ranges) and self._ranges[lo][0] < end:
            return False
        self._ranges.insert(lo, (start, end))
        return True


class Redactor:
    """Finds and replaces the chosen kinds of personal data and secrets (all by default)."""

    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        unknown = [k for k in chosen if k not in KINDS]
        if unknown:
            raise ValueError(
                f"unknown redaction kind {unknown[0]!r}; expected some of {', '.join(KINDS)}"
            )
        self.kinds = frozenset(chosen)

    def spans(self, text: str) -> list[Span]:
        """Findings in ``text``: non-overlapping and sorted by position."""
        taken = _Taken()
        for m in _PLACEHOLDER_RE.finditer(text):
            taken.add(*m.span())
        found: list[Span] = []
        for kind in PRIORITY:
            if kind not in self.kinds:
                continue
            candidates = sorted(set(_FINDERS[kind](text)), key=lambda se: (se[0], -se[1]))
            for start, end in candidates:
                if start < end and taken.add(start, end):
                    found.append(Span(start, end, kind))
        found.sort(key=lambda s: s.start)
        return found

    def redact(self, text: str) -> str:
        """``text`` with every finding replaced by its placeholder."""
        parts: list[str] = []
        pos = 0
        for span in self.spans(text):
            parts += (text[pos : span.start], PLACEHOLDERS[span.kind])
            pos = span.end
        parts.append(text[pos:])
        return "".join(parts)

    def redact_identifier(self, value: str, max_length: int = 256) -> str:
        """An identifier (a conversation id, a metadata key) with its findings replaced, plus
        ``#`` and 12 hex digits of the SHA-256 of the original, so that two ids that redact
        alike (two e-mail addresses) stay two ids. Unchanged when nothing is found, so that
        redacting a stored id again gives the same id; at most ``max_length`` characters."""
        redacted = self.redact(value)
        if redacted == value:
            return value
        digest = "#" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        return redacted[: max_length - len(digest)] + digest

    def redact_tokens(self, tokens: list[str]) -> list[str]:
        """The per-token view, redacted: one string per token, so row i still matches token i.

        Findings are located on the joined text. A token loses the characters it shares with a
        finding; the token where a finding starts carries its placeholder. Joining the result
        gives ``redact("".join(tokens))``.
        """
        text = "".join(tokens)
        spans = self.spans(text)
        out: list[str] = []
        first = 0  # first span that ends after the current token starts
        offset = 0
        for token in tokens:
            start, end = offset, offset + len(token)
            offset = end
            while first < len(spans) and spans[first].end <= start:
                first += 1
            if first == len(spans) or spans[first].start >= end:
                out.append(token)
                continue
            parts: list[str] = []
            pos = start
            i = first
            while i < len(spans) and spans[i].start < end:
                span = spans[i]
                if span.start >= start:
                    parts += (text[pos : span.start], PLACEHOLDERS[span.kind])
                pos = min(span.end, end)
                i += 1
            parts.append(text[pos:end])
            out.append("".join(parts))
        return out

    def redact_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Copies of chat messages with their content redacted; role and other keys kept.

        Content is a string, or a list of parts where ``{"type": "text", "text": ...}`` parts
        are redacted and other parts kept as they are.
        """
        redacted: list[dict[str, Any]] = []
        for message in messages:
            content = message.get("content")
            copy = dict(message)
            if isinstance(content, str):
                copy["content"] = self.redact(content)
            elif isinstance(content, list):
                copy["content"] = [
                    {**part, "text": self.redact(part["text"])}
                    if isinstance(part, dict) and isinstance(part.get("text"), str)
                    else part
                    for part in content
                ]
            redacted.append(copy)
        return redacted

    def count(self, text: str) -> Counter[str]:
        """How many findings of each kind (a Counter: absent kinds read as 0), for metrics."""
        return Counter(span.kind for span in self.spans(text))
