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

The finders are in :mod:`monitor.service.secret_finders` (secrets) and
:mod:`monitor.service.pii_finders` (cards, e-mail addresses, IPs, phones); this module picks
among their candidates and replaces them.

This is the standard library only (``re`` and ``ipaddress``): no well-kept library does typed
PII redaction with a Luhn check without pulling in heavy NLP models, and the rules here are
small enough to read and test.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, get_args

from monitor.service.pii_finders import find_cards, find_emails, find_ips, find_phones
from monitor.service.secret_finders import find_secrets

RedactionKind = Literal["email", "phone", "card", "ip", "secret"]
KINDS: tuple[RedactionKind, ...] = get_args(RedactionKind)
PLACEHOLDERS: dict[str, str] = {kind: f"[{kind.upper()}]" for kind in KINDS}
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

_FINDERS: dict[str, _Finder] = {
    "secret": find_secrets,
    "card": find_cards,
    "email": find_emails,
    "ip": find_ips,
    "phone": find_phones,
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
