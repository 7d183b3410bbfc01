"""Finders of personal data for the redactor (:mod:`monitor.service.redaction`): payment
cards (with the Luhn check), e-mail addresses, IP addresses and phone numbers.

Each finder yields candidate (start, end) spans for its kind, in any order; they may overlap.
What counts and what does not is listed in the module docstring of
:mod:`monitor.service.redaction`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator


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


def find_cards(text: str) -> Iterator[tuple[int, int]]:
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


def find_emails(text: str) -> Iterator[tuple[int, int]]:
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


def find_ips(text: str) -> Iterator[tuple[int, int]]:
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


def find_phones(text: str) -> Iterator[tuple[int, int]]:
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
