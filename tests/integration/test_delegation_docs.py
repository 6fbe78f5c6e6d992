"""Every example of docs/delegation.md, run: the Python minting code, the settings and
policy snippets, the CLI commands, the console commands and the RLS policy (in a real
Postgres, fed by the statement guardproxy sends before a transaction)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pgcluster import PgCluster

from guardproxy.config import Settings
from guardproxy.delegation import console
from guardproxy.delegation.claims import Delegation
from guardproxy.delegation.mint import generate_key
from guardproxy.delegation.postgres import settings_sql
from guardproxy.delegation.verify import _FRESH_HINT, Verifier
from guardproxy.policy import load_policy_set

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "delegation.md").read_text()
DB = "delegation_docs"


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)```", DOC, re.S | re.M)


def gp(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def sh_commands(block: str) -> list[list[str]]:
    """The commands of a sh block (continuation lines joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def issuer_settings(tmp_path: Path, public: Path) -> Settings:
    snippet = yaml.safe_load(blocks("yaml")[0])
    snippet["delegation_issuers"][0]["key_file"] = str(public)
    return Settings.model_validate(snippet)


def test_the_python_example_mints_a_token_guardproxy_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = generate_key("EdDSA")
    (tmp_path / "app.key").write_bytes(private)
    (tmp_path / "app.pub").write_bytes(public)
    monkeypatch.setenv("GUARDPROXY_SIGNING_KEY", str(tmp_path / "app.key"))
    [code] = blocks("python")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/delegation.md", "exec"), namespace)
    token = namespace["mint_for_agent"]("support-1", [42, 43], "T-17")  # type: ignore[operator]
    verifier = Verifier.from_settings(issuer_settings(tmp_path, tmp_path / "app.pub"))
    d = verifier.verify(token, "support-1", time.time())
    assert (d.principals, d.task, d.issuer) == (("42", "43"), "T-17", "shop-app")
    assert d.expires_at - d.issued_at == 900 and d.narrowing is not None


def test_the_settings_and_policy_snippets_load(tmp_path: Path) -> None:
    settings = issuer_settings(tmp_path, tmp_path / "shop.pub")
    [issuer] = settings.delegation_issuers
    assert (issuer.issuer, issuer.audiences, issuer.max_ttl) == ("shop-app", ["guardproxy"], 3600)
    assert (settings.delegation_clock_skew, settings.delegation_revocations_refresh) == (30, 5)
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "support.yaml").write_text(blocks("yaml")[1])
    policy = load_policy_set(policy_dir).match("support-1")
    assert policy is not None and policy.document.delegation == "required"
    assert [f.source for _, f in policy.row_filters] == ["customer_id = ANY({principals})"]


def test_the_cli_examples_run(tmp_path: Path) -> None:
    keygen, mint, explain = (sh_commands(b) for b in blocks("sh")[:3])
    assert gp(*keygen[0][1:], cwd=tmp_path).returncode == 0
    out = gp(*mint[0][1:], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "run.jwt").write_text(out.stdout)
    (tmp_path / "policies").symlink_to(ROOT / "policies")
    judged = gp(*explain[0][1:], cwd=tmp_path)
    assert judged.returncode == 0, judged.stdout + judged.stderr
    assert "signature, expiry, audience and agent verified" in judged.stdout
    assert "decision: " in judged.stdout and "decision: deny" not in judged.stdout


def test_the_console_examples_parse_and_the_error_example_is_what_the_proxy_says() -> None:
    block = next(b for b in blocks("sql") if "REVOKE TOKEN" in b)
    for line in block.splitlines():
        statement = line.split("--")[0].strip()
        assert console.parse(statement) is not None, statement
    shown = re.search(r"^```\n(ERROR:.*?)```", DOC, re.S | re.M)
    assert shown is not None
    error, hint = shown.group(1).strip().splitlines()
    assert re.fullmatch(
        r"ERROR:  delegation token \S+ expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s ago\)",
        error,
    )
    assert hint == f"HINT:  {_FRESH_HINT}"


@pytest.fixture
def shop(pg: PgCluster) -> Iterator[PgCluster]:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")
    pg.psql(f"CREATE DATABASE {DB} OWNER app_owner", dbname="postgres")
    pg.psql(
        "DO $$ BEGIN CREATE ROLE guard_support; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        dbname=DB,
    )
    pg.psql(
        "CREATE TABLE orders (id int PRIMARY KEY, customer_id bigint NOT NULL, "
        "fulfillment_status text NOT NULL DEFAULT 'pending');"
        "INSERT INTO orders (id, customer_id) VALUES (1, 42), (2, 43), (3, 99);"
        "GRANT SELECT, INSERT, UPDATE ON orders TO guard_support;",
        user="app_owner",
        dbname=DB,
    )
    yield pg
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")


def test_the_rls_example_shows_an_agent_only_its_principals_rows(shop: PgCluster) -> None:
    rls = next(b for b in blocks("sql") if "ROW LEVEL SECURITY" in b)
    shop.psql(rls, user="app_owner", dbname=DB)
    token = Delegation(
        agent_id="support-1",
        subject="support-1",
        issuer="shop-app",
        token_id="run-1",
        principals=("42", "43"),
        task="T-17",
        issued_at=0.0,
        expires_at=900.0,
        narrowing=None,
        fingerprint="0" * 16,
    )

    def agent(d: Delegation | None, sql: str) -> str:
        return shop.psql(f"SET ROLE guard_support; {settings_sql(d)}; {sql}", dbname=DB)

    assert agent(token, "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders") == "1,2"
    assert agent(None, "SELECT count(*) FROM orders") == "0"
    assert agent(token, "UPDATE orders SET fulfillment_status = 'packed'") == ""
    with pytest.raises(RuntimeError, match="row-level security"):
        agent(token, "INSERT INTO orders (id, customer_id) VALUES (4, 99)")
    everything = shop.psql(
        "SELECT string_agg(id || ':' || fulfillment_status, ',' ORDER BY id) FROM orders",
        user="app_owner",
        dbname=DB,
    )
    assert everything == "1:packed,2:packed,3:pending"  # customer 99's order untouched
