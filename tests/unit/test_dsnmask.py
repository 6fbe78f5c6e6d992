"""mask_dsn (guardproxy/dsnmask.py): no credential form libpq accepts is shown, and
everything else stays as written. libpq itself (psycopg's conninfo_to_dict) is the
oracle for what a string's password is."""

from __future__ import annotations

from urllib.parse import quote

import psycopg
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

from guardproxy.dsnmask import MASK, is_secret_key, mask_dsn

CASES = [
    # URIs: user info
    ("postgresql://u:secret@db.internal:5432/app", "postgresql://u:***@db.internal:5432/app"),
    ("postgres://u:secret@db/app", "postgres://u:***@db/app"),
    ("POSTGRESQL://u:secret@db/app", "POSTGRESQL://u:***@db/app"),
    ("postgresql://u:p%40ss%3Aw%2Frd@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:p@ss@db/app", "postgresql://u:***@db/app"),  # an unencoded @
    ("postgresql://u:a:b:c@db/app", "postgresql://u:***@db/app"),
    ("postgresql://u:x@h/y@db/app", "postgresql://u:***@db/app"),  # an unencoded / and @
    ("postgresql://u:a?b=c@db/app", "postgresql://u:***@db/app"),
    ("postgresql://:secret@db/app", "postgresql://:***@db/app"),
    ("postgresql://u:secret@h1:5432,h2:5433/app", "postgresql://u:***@h1:5432,h2:5433/app"),
    ("postgresql://u:secret@[::1]:5432/app", "postgresql://u:***@[::1]:5432/app"),
    ("postgresql://u:secret@%2Fvar%2Frun/app", "postgresql://u:***@%2Fvar%2Frun/app"),
    ("postgresql://u:secret@", "postgresql://u:***@"),
    # URIs: query parameters
    (
        "postgresql://u@db/app?password=secret&sslmode=require",
        "postgresql://u@db/app?password=***&sslmode=require",
    ),
    (
        "postgresql://u@db/app?sslmode=require&sslpassword=keypw&passfile=/etc/pgpass",
        "postgresql://u@db/app?sslmode=require&sslpassword=***&passfile=/etc/pgpass",
    ),
    ("postgresql://db/app?pass%77ord=secret", "postgresql://db/app?pass%77ord=***"),
    ("postgresql://db/app?PASSWORD=secret", "postgresql://db/app?PASSWORD=***"),
    ("postgresql://db/app?password=a&b=c&sslmode=require", "postgresql://db/app?password=***&sslmode=require"),
    ("postgresql://db/app?password=a&sslmode", "postgresql://db/app?password=***"),
    ("postgresql://db/app?password=x&password=y", "postgresql://db/app?password=***&password=***"),
    ("postgresql://db/app?api_token=t&sslrootcert=/ca.pem", "postgresql://db/app?api_token=***&sslrootcert=/ca.pem"),
    ("postgresql://db/app?dbname=host%3Dh%20password%3Dx", "postgresql://db/app?dbname=***"),
    # keyword/value strings
    ("host=db user=u password=secret dbname=app", "host=db user=u password=*** dbname=app"),
    ("host=db password = 'se cr\\'et' dbname=app", "host=db password = *** dbname=app"),
    ("password='unterminated dbname=app", "password=***"),
    ("sslpassword=k\\ ey sslkey=/k.pem", "sslpassword=*** sslkey=/k.pem"),
    ("PASSWORD=x", "PASSWORD=***"),
    ("host=db password", "host=db password ***"),
    ("dbname='host=db password=secret'", "dbname='host=db password=***'"),
    ("dbname=postgresql://u:secret@db/app", "dbname=postgresql://u:***@db/app"),
    # nothing to hide
    ("postgresql://u@db:5432/app?sslmode=verify-full", "postgresql://u@db:5432/app?sslmode=verify-full"),
    ("host=/var/run/postgresql passfile=/home/u/.pgpass", "host=/var/run/postgresql passfile=/home/u/.pgpass"),
    ("", ""),
    ("10.0.3.7:6432", "10.0.3.7:6432"),
]  # fmt: skip


@pytest.mark.parametrize(("dsn", "masked"), CASES)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_secret_keys() -> None:
    assert is_secret_key("password") and is_secret_key(" SSLPassword ")
    assert is_secret_key("db_secret") and is_secret_key("api_token")
    assert not is_secret_key("passfile") and not is_secret_key("sslkey")
    assert not is_secret_key("host") and not is_secret_key("sslmode")


# ---------------------------------------------------------------- generated


# Passwords carry a marker no other part of the generated strings contains.
passwords = st.text(min_size=1, max_size=20).map(lambda t: "Zq" + t)
raw_passwords = st.text(
    alphabet=st.characters(codec="ascii", exclude_characters="/?#&\x00"), max_size=20
).map(lambda t: "Zq" + t)
hosts = st.sampled_from(["db", "db.internal", "10.0.0.7", "[::1]", "h1:5432,h2:5433", ""])
queries = st.sampled_from(
    ["", "?sslmode=require", "?application_name=app&connect_timeout=5", "?passfile=/p"]
)


@given(passwords, hosts, queries)
def test_an_encoded_user_info_password_is_masked_and_nothing_else(
    pw: str, host: str, query: str
) -> None:
    dsn = f"postgresql://agent:{quote(pw, safe='')}@{host}/app{query}"
    assert mask_dsn(dsn) == f"postgresql://agent:{MASK}@{host}/app{query}"


@given(raw_passwords, hosts, queries)
def test_an_unencoded_user_info_password_is_masked(pw: str, host: str, query: str) -> None:
    dsn = f"postgresql://agent:{pw}@{host}/app{query}"
    assert mask_dsn(dsn) == f"postgresql://agent:{MASK}@{host}/app{query}"


@given(passwords, st.sampled_from(["password", "sslpassword", "Password"]), queries)
def test_a_query_password_is_masked(pw: str, key: str, query: str) -> None:
    tail = query.replace("?", "&")
    dsn = f"postgresql://agent@db/app?{key}={quote(pw, safe='')}{tail}"
    assert mask_dsn(dsn) == f"postgresql://agent@db/app?{key}={MASK}{tail}"


@given(passwords, st.sampled_from(["password", "sslpassword"]))
def test_a_keyword_password_is_masked_quoted_or_not(pw: str, key: str) -> None:
    quoted = "'" + pw.replace("\\", "\\\\").replace("'", "\\'") + "'"
    dsn = f"host=db user=agent {key}={quoted} dbname=app"
    assert mask_dsn(dsn) == f"host=db user=agent {key}={MASK} dbname=app"
    bare = "".join("\\" + c if c.isspace() or c in "\\'" else c for c in pw)
    dsn = f"host=db {key} = {bare} dbname=app"
    assert mask_dsn(dsn) == f"host=db {key} = {MASK} dbname=app"


def _libpq_secrets(dsn: str) -> list[str]:
    try:
        parsed = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return []
    return [str(v) for k, v in parsed.items() if k in ("password", "sslpassword") and v]


pieces = st.lists(
    st.one_of(
        st.sampled_from(
            ["host=db", "user=agent", "dbname=app", "sslmode=require", "port=5432", " ", "'"]
        ),
        st.builds(lambda pw: f"password={pw}", raw_passwords),
        st.builds(lambda pw: f"password='{pw}'", raw_passwords),
        st.builds(lambda pw: f"sslpassword = {pw}", raw_passwords),
    ),
    max_size=6,
).map(" ".join)
uris = st.builds(
    lambda pw, host, q, pw2: f"postgresql://agent:{pw}@{host}/app{q}&password={pw2}",
    st.one_of(raw_passwords, passwords.map(lambda p: quote(p, safe=""))),
    hosts,
    queries.map(lambda q: q or "?"),
    st.one_of(raw_passwords, passwords.map(lambda p: quote(p, safe=""))),
)


@settings(max_examples=300)
@given(st.one_of(pieces, uris))
def test_no_password_libpq_reads_is_left_in_the_masked_string(dsn: str) -> None:
    secrets = _libpq_secrets(dsn)
    assume(secrets)
    masked = mask_dsn(dsn)
    for secret in secrets:
        assert "Zq" not in masked, (dsn, masked, secret)


def test_a_control_character_python_calls_a_space_does_not_end_a_value() -> None:
    """libpq's isspace() is the C locale's: \\x1f belongs to the value (found by hypothesis)."""
    from guardproxy.dsnmask import mask_dsn

    masked = mask_dsn("password=Zq\x1f= password=Zq")
    assert "Zq" not in masked
