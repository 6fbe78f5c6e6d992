"""Which column names look like personal data or secrets, by the words they are made of.

A name is split into words (``customer_email`` -> customer, email; ``phoneNumber``
-> phone, number) and each word, or pair of words, is looked up. It is a guess
from names only: `guardproxy init` proposes these columns as ``deny_columns`` and
`guardproxy check --upstream` warns when a table glob covers one; a person
decides. False positives cost a line in a policy; a missed column costs a leak,
so the lists lean towards flagging.
"""

from __future__ import annotations

import re
from itertools import pairwise

_WORDS: dict[str, str] = {}
for _kind, _names in {
    "contact": "email e-mail mail phone mobile telephone tel fax msisdn whatsapp",
    "address": "address addr street postcode postal zip zipcode",
    "name": "firstname lastname fullname surname forename",
    "birth date": "birth birthday birthdate dob",
    "credential": "password passwd pwd secret token apikey otp salt credential credentials",
    "government id": "ssn passport nin nino taxid",
    "financial": "iban card pan cvv cvc ccnumber",
    "network": "ip useragent",
}.items():
    for _word in _names.split():
        _WORDS[_word] = _kind

_PAIRS = {
    ("first", "name"): "name",
    ("last", "name"): "name",
    ("full", "name"): "name",
    ("given", "name"): "name",
    ("family", "name"): "name",
    ("api", "key"): "credential",
    ("private", "key"): "credential",
    ("secret", "key"): "credential",
    ("access", "key"): "credential",
    ("tax", "id"): "government id",
    ("national", "id"): "government id",
    ("social", "security"): "government id",
    ("account", "number"): "financial",
    ("user", "agent"): "network",
}

_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def words(name: str) -> list[str]:
    return [w.lower() for w in _SPLIT.split(name) if w]


def personal_kind(column: str) -> str | None:
    """What kind of personal data or secret the column name suggests, or None."""
    parts = words(column)
    for first, second in pairwise(parts):
        kind = _PAIRS.get((first, second)) or _WORDS.get(first + second)
        if kind is not None:
            return kind
    for part in parts:
        kind = _WORDS.get(part)
        if kind is not None:
            return kind
    return None


def personal_columns(columns: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The columns of a table whose names look personal, with what they look like."""
    found = {}
    for column in columns:
        kind = personal_kind(column)
        if kind is not None:
            found[column] = kind
    return found
