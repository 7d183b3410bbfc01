"""Redaction before storage: typed placeholders for personal data and secrets, near misses kept.

Fast and model-free. The per-token view is checked as a property over realistic samples cut
into tokens several ways: joining the redacted tokens gives the redacted text, and the list
keeps its length.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import pytest

from monitor.service.redaction import KINDS, PLACEHOLDERS, Redactor, Span

R = Redactor()

SIGNATURE = """\
Thanks for the quick turnaround!

--
Jane Doe
Senior Engineer, Acme Corp
jane.doe+support@acme-corp.co.uk | Mobile: +1 (415) 555-0132
Office: 020 7946 0958
"""

SUPPORT_CHAT = """\
user: hi, my card was charged twice. call me back on +44 20 7946 0958 please
assistant: Sorry about that! Could you confirm the number on the account?
user: it's 415-555-0132, or my work line 4155550132 after 5pm
assistant: Thanks, I have noted 415.555.0132 and will call before 17:30.
"""

PAYMENT = """\
Visa 4111 1111 1111 1111, Mastercard 5500-0000-0000-0004, Amex 378282246310005.
Refund the Discover card 6011000990139424 instead.
"""

LOGS = """\
2024-11-21T12:30:45Z INFO  accepted connection from 203.0.113.42:51234
2024-11-21T12:30:46Z WARN  upstream 10.12.0.7 slow (1532 ms), via 2001:db8:85a3::8a2e:370:7334
2024-11-21T12:30:47Z INFO  client [fe80::1ff:fe23:4567:890a]:443 mapped ::ffff:192.0.2.128
2024-11-21T12:30:48Z DEBUG health check on 127.0.0.1 and ::1 ok, bind 0.0.0.0
"""

DOTENV = """\
# local settings, do not commit
DEBUG=true
PORT=8080
DB_PASSWORD=s3cr3t!Pa55
DATABASE_URL=postgres://app:hunter2@db.internal:5432/app
OPENAI_API_KEY=sk-proj-4fA9bX2kQ7mZ1pL8rT3vW6yN0cE5hJ
STRIPE_SECRET_KEY=sk_live_51HxYz2AbCdEfGhIjKlMnOpQr
AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE
AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY
GITHUB_TOKEN=ghp_16C7e42F292c6912E7710c838347Ae178B4a
SLACK_BOT_TOKEN=xoxb-2048-4096-a1b2c3d4e5f6
MAX_TOKENS=512
"""

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)

CURL = (
    "curl -s https://api.example.com/v1/orders \\\n"
    f'  -H "Authorization: Bearer {JWT}" \\\n'
    '  -H "X-Api-Key: 9f8e7d6c5b4a3210" \\\n'
    "  -d 'customer=jane.doe@example.com'"
)

PEM = """\
Here is the deploy key, please rotate it:
-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACDx5W2f3Z9kq0t1mR7PqJ8yWcN4xE6uV2bH9sL3aK0gAAAAJj4nL0s+J5y
-----END OPENSSH PRIVATE KEY-----
Thanks."""

CODE = """\
import os

from fastapi import FastAPI

app = FastAPI()
api_key = os.environ["API_KEY"]
token = os.getenv("GITHUB_TOKEN")
password: str | None = None
secret = settings.secret


@app.get("/users/{user_id}")
def read_user(user_id: int) -> dict[str, int]:
    rows = data[1::2]
    return {"max_tokens": 256, "token_count": len(rows)}
"""

NEAR_MISSES = [
    "order 4111 1111 1111 1112 shipped",  # Luhn fails
    "order id 5412750109056216",  # Luhn fails
    "request 1234567812345678",  # no card network starts with 1
    "release v2.13.0 and v1.2.3.4",
    "three-part 10.0.0 is not an address",
    "bad octet 999.1.1.1",
    "SNMP OID 1.3.6.1.4.1.2021",
    "due 2024-11-21 at 12:30:45",
    "ISBN 978-3-16-148410-0",
    "only $1,299.99 today",
    "active 1999-2024",
    "room 42, floor 7, ext 1234, code 555-0132",
    "ping user@localhost",
    "thanks @jane and @ops-team",
    "@app.get('/health')",
    "Enter your password",
    "password",
    "password=",
    "the password is hunter2",
    "Reset your password: click the link below",
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8",
    "trace 123e4567-e89b-12d3-a456-426614174000",
    "sk",
    "uses sk-learn style pipelines",
    'api_key = os.environ["API_KEY"]',
    "token = os.getenv('TOKEN')",
    "token = get_token()",
    "password: Optional[str] = None",
    "key = vault.read(path)",
    "secret = settings.secret",
    "PASSWORD=${DB_PASSWORD}",
    'token: "{{ secrets.GITHUB_TOKEN }}"',
    "api_key=<your-api-key>",
    "api_key: YOUR_API_KEY",
    "token = None",
    "password: str",
    "max_tokens=256",
    '{"password": {"type": "string", "minLength": 8}, "credentials": ["a", "b"]}',
    "token_count: 12",
    "password_hash: 5e884898da28",
    "bearer bonds and basic arithmetic",
    "ts=1700000000 ms=1700000000000",
    "id 0123456789",
    "local 127.0.0.1, ::1, bind 0.0.0.0 netmask 255.255.255.0",
    "xs[1::2], xs[::-1], std::vector, Face::Bead",
    "mac 00:1A:2B:3C:4D:5E at 10:30:00",
    "john at example dot com",
]

SAMPLES = [SIGNATURE, SUPPORT_CHAT, PAYMENT, LOGS, DOTENV, CURL, JWT, PEM, CODE, *NEAR_MISSES]


def test_email_signature_block() -> None:
    out = R.redact(SIGNATURE)
    assert "[EMAIL] | Mobile: [PHONE]" in out
    assert "Office: [PHONE]" in out
    assert "Jane Doe\nSenior Engineer, Acme Corp" in out  # names are not redacted
    assert "acme-corp" not in out
    assert R.count(SIGNATURE) == {"email": 1, "phone": 2}


def test_support_chat_phone_formats() -> None:
    out = R.redact(SUPPORT_CHAT)
    assert "back on [PHONE] please" in out
    assert "it's [PHONE], or my work line [PHONE] after 5pm" in out
    assert "noted [PHONE] and will call before 17:30" in out
    assert not re.search(r"\d{4}", out)
    assert R.count(SUPPORT_CHAT)["phone"] == 4


@pytest.mark.parametrize(
    "number",
    [
        "+1 (415) 555-0132",
        "(415) 555-0132",
        "020 7946 0958",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "0044 20 7946 0958",
        "415-555-0132",
        "415.555.0132",
        "1-800-555-0199",
        "4155550132",
        "+14155550132",
        "01 23 45 67 89",
        "07700 900123",
    ],
)
def test_phone_formats_inside_text(number: str) -> None:
    assert R.redact(f"Reach me at {number}, thanks.") == "Reach me at [PHONE], thanks."
    assert R.redact(f"tel:{number}") == "tel:[PHONE]"


def test_payment_cards_with_separators() -> None:
    out = R.redact(PAYMENT)
    assert out == (
        "Visa [CARD], Mastercard [CARD], Amex [CARD].\nRefund the Discover card [CARD] instead.\n"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111 1111 1111 1111 exp 12/26", "card [CARD] exp 12/26"),
        ("4111 1111 1111 1111 123", "[CARD] 123"),  # a trailing CVV group is not the card
        ("Amex 3782 822463 10005.", "Amex [CARD]."),
        ("ref 12 4111 1111 1111 1111", "ref 12 [CARD]"),
        ("pay:5500-0000-0000-0004;", "pay:[CARD];"),
    ],
)
def test_card_boundaries(text: str, expected: str) -> None:
    assert R.redact(text) == expected


def test_ip_addresses_in_logs() -> None:
    out = R.redact(LOGS)
    assert "from [IP]:51234" in out
    assert "upstream [IP] slow (1532 ms), via [IP]\n" in out
    assert "client [[IP]]:443 mapped [IP]\n" in out
    # Loopback and unspecified addresses identify no host and stay readable.
    assert "health check on 127.0.0.1 and ::1 ok, bind 0.0.0.0" in out
    assert out.count("2024-11-21T12:30:4") == 4  # timestamps untouched
    assert R.count(LOGS) == {"ip": 5}


def test_dotenv_values_redacted_names_kept() -> None:
    out = R.redact(DOTENV)
    for name in (
        "DB_PASSWORD",
        "OPENAI_API_KEY",
        "STRIPE_SECRET_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "GITHUB_TOKEN",
        "SLACK_BOT_TOKEN",
    ):
        assert f"\n{name}=[SECRET]\n" in out
    assert "DATABASE_URL=postgres://app:[SECRET]@db.internal:5432/app" in out
    assert "DEBUG=true\nPORT=8080\n" in out
    assert "MAX_TOKENS=512" in out
    assert R.count(DOTENV) == {"secret": 8}


def test_curl_with_bearer_token() -> None:
    out = R.redact(CURL)
    assert '-H "Authorization: Bearer [SECRET]"' in out
    assert '-H "X-Api-Key: [SECRET]"' in out
    assert "'customer=[EMAIL]'" in out
    assert "https://api.example.com/v1/orders" in out


@pytest.mark.parametrize(
    "secret",
    [
        JWT,
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
        "xoxb-2048-4096-a1b2c3d4e5f6",
        "xoxp-1234567890-abcdef",
        "sk-proj-4fA9bX2kQ7mZ1pL8rT3vW6yN0cE5hJ",
        "sk-ant-api03-Zx9Yw8Xv7Uu6Tt5Ss4Rr3Qq2Pp1",
        "sk_live_51HxYz2AbCdEfGhIjKlMnOpQr",
        "rk_test_4eC39HqLyjWDarjtT1zdp7dc",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    ],
)
def test_vendor_tokens(secret: str) -> None:
    assert R.redact(f"use {secret} for now") == "use [SECRET] for now"


def test_pem_private_key_block() -> None:
    assert R.redact(PEM) == "Here is the deploy key, please rotate it:\n[SECRET]\nThanks."
    cut_off = PEM.split("-----END", maxsplit=1)[0]  # a message truncated inside the block
    assert R.redact(cut_off) == "Here is the deploy key, please rotate it:\n[SECRET]\n"
    public = (
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    )
    assert R.redact(public) == public


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=hunter2", "password=[SECRET]"),
        ('"password": "correct horse battery staple"', '"password": "[SECRET]"'),
        ("client_secret: 'abc'", "client_secret: '[SECRET]'"),
        ("accessToken => 'tok3n'", "accessToken => '[SECRET]'"),
        ("Password: Hunter2.", "Password: [SECRET]."),
        ("Server=db;Uid=sa;Pwd=MyP@ss1;", "Server=db;Uid=sa;Pwd=[SECRET];"),
        ("https://x.io/cb?api_key=abc123def456&page=2", "https://x.io/cb?api_key=[SECRET]&page=2"),
        ("--password=hunter2 --verbose", "--password=[SECRET] --verbose"),
        ('{\\"api_key\\": \\"k-123\\"}', '{\\"api_key\\": \\"[SECRET]\\"}'),
        ("self.password = 'p@ss(word)'", "self.password = '[SECRET]'"),
        ("PASSWORD=Summer(2024)", "PASSWORD=[SECRET]"),
        ("(see password=hunter2).", "(see password=[SECRET])."),
        ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [SECRET]"),
        (
            "smtp://mailer:p%40ss@mail.example.com:587",
            "smtp://mailer:[SECRET]@mail.example.com:587",
        ),
    ],
)
def test_assignments_keep_the_name(text: str, expected: str) -> None:
    assert R.redact(text) == expected


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_kept(text: str) -> None:
    assert R.spans(text) == []
    assert R.redact(text) == text


def test_code_sample_is_kept() -> None:
    assert R.redact(CODE) == CODE


def test_overlaps_go_to_the_higher_priority_kind() -> None:
    # A secret value that is also a card, a card glued to a domain, a phone inside an e-mail.
    assert R.spans("password=4111111111111111") == [Span(9, 25, "secret")]
    assert R.redact("4111111111111111@example.com") == "[CARD]@example.com"
    assert R.redact("4155550132@example.com") == "[EMAIL]"
    assert R.redact("postgres://app:hunter2@db.example.com/x") == (
        "postgres://app:[SECRET]@db.example.com/x"
    )


def test_spans_are_sorted_offsets_into_the_original() -> None:
    text = "mail a@b.io or call 415-555-0132 from 198.51.100.7 with 4111111111111111"
    spans = R.spans(text)
    assert [s.kind for s in spans] == ["email", "phone", "ip", "card"]
    assert [text[s.start : s.end] for s in spans] == [
        "a@b.io",
        "415-555-0132",
        "198.51.100.7",
        "4111111111111111",
    ]
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))


def test_kinds_selection() -> None:
    emails = Redactor(kinds=["email"])
    text = "jane@example.com 415-555-0132 10.1.2.3 4111 1111 1111 1111 password=x1"
    assert emails.redact(text) == "[EMAIL] 415-555-0132 10.1.2.3 4111 1111 1111 1111 password=x1"
    assert (
        Redactor("ip").redact(text)
        == "jane@example.com 415-555-0132 [IP] 4111 1111 1111 1111 password=x1"
    )
    assert Redactor([]).redact(text) == text


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match="'ssn'"):
        Redactor(kinds=["email", "ssn"])


@pytest.mark.parametrize("text", SAMPLES)
def test_redaction_is_idempotent(text: str) -> None:
    once = R.redact(text)
    assert R.redact(once) == once


def test_placeholders_are_never_matched() -> None:
    text = " ".join(PLACEHOLDERS[k] for k in KINDS)
    assert R.spans(text) == []
    for wrapped in ("password=[SECRET]", 'token: "[SECRET]"', "Bearer [SECRET]", "[IP]:8080"):
        assert R.spans(wrapped) == []


def test_count_is_a_counter_for_metrics() -> None:
    counts = R.count(SIGNATURE + PAYMENT)
    assert counts == {"email": 1, "phone": 2, "card": 4}
    assert counts["secret"] == 0


def test_redact_messages_keeps_roles() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "I'm jane@example.com, card 4111 1111 1111 1111", "name": "j"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "call 415-555-0132"},
                {"type": "image_url", "image_url": {"url": "https://x.io/a.png"}},
            ],
        },
    ]
    out = R.redact_messages(messages)
    assert out == [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "I'm [EMAIL], card [CARD]", "name": "j"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "call [PHONE]"},
                {"type": "image_url", "image_url": {"url": "https://x.io/a.png"}},
            ],
        },
    ]
    assert messages[1]["content"] == "I'm jane@example.com, card 4111 1111 1111 1111"  # no mutation


def test_redact_tokens_example() -> None:
    tokens = ["Hello", " my", " email", " is", " jo", "hn", "@", "example", ".com"]
    assert R.redact_tokens(tokens) == ["Hello", " my", " email", " is", " [EMAIL]", "", "", "", ""]
    tokens = ["call", " 415", "-", "555", "-01", "32", " now"]
    assert R.redact_tokens(tokens) == ["call", " [PHONE]", "", "", "", "", " now"]
    # A token that straddles the end of a finding keeps its own characters.
    assert R.redact_tokens(["ip 10.0", ".0.9:80", "80"]) == ["ip [IP]", ":80", "80"]


def _bpe_like(text: str) -> list[str]:
    """Word pieces with their leading space, long words cut in three-letter chunks."""
    pieces = re.findall(r" ?[A-Za-z]+| ?\d{1,3}| ?[^\sA-Za-z\d]+|\s+", text)
    out: list[str] = []
    for piece in pieces:
        out += [piece[i : i + 4] for i in range(0, len(piece), 4)] if len(piece) > 6 else [piece]
    return out


def _tokenizations(text: str) -> list[list[str]]:
    rng = random.Random(len(text))
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, len(text) // 3)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return [
        _bpe_like(text),
        list(text),  # one character per token
        chunks,  # random cuts
        ["", *_bpe_like(text), ""],  # empty pieces around and between
        [text],  # one token
    ]


@pytest.mark.parametrize("text", SAMPLES)
def test_redact_tokens_matches_redact(text: str) -> None:
    expected = R.redact(text)
    for tokens in _tokenizations(text):
        assert "".join(tokens) == text
        out = R.redact_tokens(tokens)
        assert len(out) == len(tokens)
        assert "".join(out) == expected
        for before, after in zip(tokens, out, strict=True):
            if before == after:
                continue
            # A changed token lost characters and gained at most placeholders.
            assert len(re.sub(r"\[(?:EMAIL|PHONE|CARD|IP|SECRET)\]", "", after)) <= len(before)


def test_redact_tokens_with_only_emails() -> None:
    tokens = ["mail", " jane", "@example", ".com", " or", " 415", "-555-0132"]
    out = Redactor(["email"]).redact_tokens(tokens)
    assert out == ["mail", " [EMAIL]", "", "", " or", " 415", "-555-0132"]


def test_mixed_fragments_stay_consistent() -> None:
    """Samples cut at separators and glued back in random orders: still idempotent and tokenwise."""
    rng = random.Random(7)
    fragments = [f for s in SAMPLES for f in re.split(r"([\s,;:.\-@()\[\]\"'=]+)", s) if f]
    fragments += [*PLACEHOLDERS.values(), "-", ".", ":", "::", "+1", "0", "@", "password="]
    for _ in range(300):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 10)))
        once = R.redact(text)
        assert R.redact(once) == once, text
        for tokens in _tokenizations(text) if len(text) > 1 else [[text]]:
            assert "".join(R.redact_tokens(tokens)) == once, (text, tokens)


AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The whole value goes, "&" included, unless a query string goes on after it.
        ("DB_PASSWORD=Tr0ub4dor&3xyz", "DB_PASSWORD=[SECRET]"),
        ("DB_PASSWORD=Tr0ub4dor&3xyz\nPORT=80", "DB_PASSWORD=[SECRET]\nPORT=80"),
        ("/cb?token=abc123&next=/home", "/cb?token=[SECRET]&next=/home"),
        # AWS secret access keys: with "=", with a space only, in the CLI's own forms.
        (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_access_key = [SECRET]"),
        (
            f"aws configure set aws_secret_access_key {AWS_SECRET}",
            "aws configure set aws_secret_access_key [SECRET]",
        ),
        (
            f"aws s3 ls --aws-secret-access-key {AWS_SECRET}",
            "aws s3 ls --aws-secret-access-key [SECRET]",
        ),
        # A generated key that happens to read like a name (…EXAMPLEKEY) is still a key.
        (
            "aws_secret_access_key = wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key = [SECRET]",
        ),
        ("api_key: YOUR_API_KEY", "api_key: YOUR_API_KEY"),
    ],
)
def test_secret_values_go_whole(text: str, expected: str) -> None:
    assert R.redact(text) == expected
    assert "".join(R.redact_tokens(_bpe_like(text))) == expected


def test_identifiers_keep_distinct_ids_apart() -> None:
    a, b = R.redact_identifier("jane@example.com"), R.redact_identifier("bob@example.com")
    assert a.startswith("[EMAIL]#") and b.startswith("[EMAIL]#") and a != b
    assert R.redact_identifier(a) == a, "a stored id redacts to itself"
    assert R.redact_identifier("order-42") == "order-42"
    long = R.redact_identifier("x" * 300 + " jane@example.com", max_length=256)
    assert len(long) == 256 and "jane" not in long and long[-13] == "#"
