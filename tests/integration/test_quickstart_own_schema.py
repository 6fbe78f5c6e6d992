"""The new-user path of docs/quickstart-own-schema.md, walked on the helpdesk schema
(sql/helpdesk_schema.sql), which is not the example shop: init -> edit -> `check
--upstream` catches planted typos -> `roles` applied by an operator who is not a
superuser (the table owner with CREATEROLE) -> `serve` refuses a login without its
grants, then starts -> an agent works through it -> `replay` of a statement log
gives the summary the doc shows -> `undo --row` brings the soft-deleted ticket back.

The doc's own YAML, commands and outputs are used and compared; each effect is
checked in the database as superuser.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docexamples as dx
import psycopg
import pytest
from pgcluster import PgCluster, free_port, wait_for_port

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
DB = "helpdesk"
OWNER, PROXY, ROLE = "helpdesk_owner", "helpdesk_proxy", "guard_helpdesk"
PASSWORD = "helpdesk_pw"
DOC = "quickstart-own-schema.md"


def gp(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=dict(env, COLUMNS="80"),
        timeout=120,
        check=False,
    )


def as_doc(text: str, pg: PgCluster) -> list[str]:
    """Output with the test server's address written as the doc's."""
    return text.replace(f"{pg.host}:{pg.port}", "db.internal:5432").rstrip("\n").split("\n")


@pytest.fixture(scope="module")
def helpdesk(pg: PgCluster) -> Iterator[dict[str, str]]:
    """A database owned by a non-superuser with CREATEROLE, the schema loaded by it, and
    a proxy login with nothing granted."""
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")
    for role in (ROLE, PROXY, OWNER):
        pg.psql(f"DROP ROLE IF EXISTS {role}", dbname="postgres")
    pg.psql(
        f"CREATE ROLE {OWNER} LOGIN CREATEROLE PASSWORD '{PASSWORD}';"
        f"CREATE ROLE {PROXY} LOGIN PASSWORD '{PASSWORD}'",
        dbname="postgres",
    )
    pg.psql(f"CREATE DATABASE {DB} OWNER {OWNER}", dbname="postgres")
    dsns = {
        "owner": pg.dsn(OWNER, DB, PASSWORD),
        "proxy": pg.dsn(PROXY, DB, PASSWORD),
        "super": pg.dsn("postgres", DB),
    }
    with psycopg.connect(dsns["owner"], autocommit=True) as conn:
        conn.execute((ROOT / "sql" / "helpdesk_schema.sql").read_text())  # type: ignore[arg-type]
    yield dsns
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)", dbname="postgres")
    for role in (ROLE, PROXY, OWNER):
        pg.psql(f"DROP ROLE IF EXISTS {role}", dbname="postgres")


def the_policy() -> str:
    """The policy the doc shows (its YAML block)."""
    return "\n".join(dx.block_starting(DOC, "# policies/helpdesk.yaml").body) + "\n"


class Serve:
    """`guardproxy serve` as a subprocess; its exit code and output when it stops."""

    def __init__(self, upstream: str, policies: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        args = [
            "serve", "--upstream", upstream, "--policies", str(policies),
            "--listen-port", str(self.port), "--pool-size", "3",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guardproxy", *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def test_the_new_user_path_on_a_schema_of_ones_own(
    pg: PgCluster, helpdesk: dict[str, str], tmp_path: Path
) -> None:
    owner = helpdesk["owner"]
    policies = tmp_path / "policies"
    policies.mkdir()
    path = policies / "helpdesk.yaml"

    # 1. guardproxy's schema, created by the owner
    up = gp("db", "upgrade", "--upstream", owner)
    assert up.returncode == 0, up.stderr

    # 2. init: a skeleton that loads as it is, allows nothing, flags personal data
    init = gp("init", "--upstream", owner, "--agent-type", "helpdesk", "-o", str(path))
    assert init.returncode == 0, init.stderr
    skeleton = path.read_text()
    assert "  #   deny_columns: [email, phone, password_hash]" in skeleton
    assert "users.email, users.phone, users.password_hash" in init.stderr
    empty = gp("check", "--policies", str(policies), "--upstream", owner)
    assert empty.returncode == 0, empty.stdout + empty.stderr
    assert (
        dx.in_order(dx.block_starting(DOC, 'agents: ["helpdesk-*"]').body, skeleton.split("\n"))
        == []
    )

    # 3. the soft-delete columns, by the command that prints them, run by the owner
    soft = gp("soft-delete", "sql", "tickets", "--upstream", owner)
    assert soft.returncode == 0, soft.stderr
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute(soft.stdout)  # type: ignore[arg-type]

    # 4-5. the doc's policy with two typos: check --upstream catches both, with lines
    policy = the_policy()
    typo = policy.replace(
        "update_columns: [status, priority]", "update_columns: [sttaus, priority]"
    )
    typo = typo.replace('select: "organization_id', 'select: "organisation_id')
    path.write_text(typo)
    caught = gp("check", "--policies", "policies", "--upstream", owner, cwd=tmp_path)
    assert caught.returncode == 1
    shown = dx.block_starting(DOC, "$ guardproxy check --policies policies --upstream").body[1:]
    assert as_doc(caught.stderr, pg) == shown, caught.stderr
    also = dx.block_starting("policies.md", "info: policies/helpdesk.yaml:").body
    assert also == shown
    path.write_text(policy)
    fixed = gp("check", "--policies", str(policies), "--upstream", owner)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"role {ROLE} does not exist yet" in fixed.stdout

    # 6. replay of a statement log: the summary the doc shows
    replay = gp(
        "replay", "--policies", str(policies), "--agent-type", "helpdesk", "--upstream", owner,
        "--from", "docs/examples/helpdesk-statements.sql", "--examples", "1",
    )  # fmt: skip
    assert replay.returncode == 0, replay.stderr
    shown = dx.block_starting(DOC, "$ guardproxy replay").body[1:]
    assert dx.matches(shown, replay.stdout.rstrip("\n").split("\n")), replay.stdout

    # 8a. serve refuses the login before the grants, naming each one
    refused = Serve(helpdesk["proxy"], policies, tmp_path / "refused.log")
    assert refused.proc.wait(60) != 0
    lines = [line for line in refused.output().split("\n") if not line[:4].isdigit() and line]
    shown = dx.block_starting(DOC, "guardproxy: guardproxy's upstream login").body
    assert lines == shown, refused.output()
    assert dx.block_starting("policies.md", "guardproxy: guardproxy's upstream login").body == shown

    # 7. roles, reviewed and applied by the owner (not a superuser)
    roles = gp("roles", "--policies", str(policies), "--upstream", owner, "--proxy-login", PROXY)
    assert roles.returncode == 0, roles.stderr
    script = roles.stdout
    assert "GRANT USAGE ON SEQUENCE public.comments_id_seq TO guard_helpdesk;" in script
    assert "GRANT DELETE" not in script
    with psycopg.connect(owner, autocommit=True) as conn:
        assert conn.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone() == (False,)
        conn.execute(script)  # type: ignore[arg-type]

    # 8b. serve starts; 9. an agent works through it
    proxy = Serve(helpdesk["proxy"], policies, tmp_path / "serve.log")
    try:
        wait_for_port("127.0.0.1", proxy.port, timeout=30)
        _agent_works(proxy.port, helpdesk)
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.output()

    # what was deleted can be listed at 80 columns and brought back by its key
    listed = gp("audit", "deletes", "--upstream", owner)
    assert listed.returncode == 0 and "public.tickets" in listed.stdout, listed.stderr
    assert all(len(line) <= 80 for line in listed.stdout.splitlines())
    undone = gp("undo", "--row", "tickets:3", "--yes", "--upstream", owner)
    assert undone.returncode == 0 and "restored 1 rows of row tickets:3" in undone.stdout, (
        undone.stderr
    )
    with psycopg.connect(helpdesk["super"]) as conn:
        assert conn.execute("SELECT deleted_at FROM tickets WHERE id = 3").fetchone() == (None,)
        record = conn.execute(
            "SELECT reason FROM guardproxy.audit_events WHERE decision = 'undo' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        assert record == ("guardproxy undo --row tickets:3",)


def _agent_works(port: int, helpdesk: dict[str, str]) -> None:
    """The session of step 9, statement by statement, and its effects in the database."""
    transcript = dx.block_starting(DOC, "SET guard.principals = '1';").body
    expected: dict[str, str] = {}
    for line in transcript:
        if line.startswith("-- "):
            expected[list(expected)[-1]] = line.removeprefix("-- ")
        else:
            expected[line] = ""
    dsn = f"postgresql://helpdesk-7@127.0.0.1:{port}/{DB}"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        for statement, shown in expected.items():
            try:
                cur = conn.execute(statement)  # type: ignore[arg-type]
                if cur.description:
                    got = " / ".join(f"{r[0]} {r[1]}" for r in cur.fetchall())
                else:
                    got = cur.statusmessage or ""
            except psycopg.Error as exc:
                got = f"ERROR:  {exc.diag.message_primary}"
            assert got == (shown or got), (statement, got)
        # the rest of the work: an update, a comment on its own ticket, a refund
        assert (
            conn.execute("UPDATE tickets SET status = 'pending' WHERE id = 1").statusmessage
            == "UPDATE 1"
        )
        conn.execute("INSERT INTO comments (ticket_id, author_id, body) VALUES (2, 2, 'Restocked')")
        conn.execute("INSERT INTO refunds (ticket_id, amount, reason) VALUES (1, 10, 'sorry')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE tickets SET organization_id = 2 WHERE id = 1")
    with psycopg.connect(helpdesk["super"], autocommit=True) as conn:
        spam = conn.execute(
            "SELECT deleted_at IS NOT NULL, deleted_by FROM tickets WHERE id = 3"
        ).fetchone()
        assert spam == (True, "helpdesk-7")  # soft-deleted, still there
        assert conn.execute("SELECT count(*) FROM comments WHERE ticket_id = 4").fetchone() == (
            1,
        )  # only the seed
        assert conn.execute(
            "SELECT count(*) FROM comments WHERE body = 'Restocked'"
        ).fetchone() == (1,)
        assert conn.execute(
            "SELECT status, organization_id FROM tickets WHERE id = 1"
        ).fetchone() == ("pending", 1)
        # around the proxy, the agent role cannot hard-delete nor read emails
        conn.execute(f"SET ROLE {ROLE}")
        for sql in ("DELETE FROM tickets WHERE id = 2", "SELECT email FROM users"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)  # type: ignore[arg-type]
        conn.execute("RESET ROLE")
        assert conn.execute("SELECT count(*) FROM tickets").fetchone() == (4,)


def test_docs_name_this_walk() -> None:
    # quickstart-own-schema.md and policies.md mark their blocks as checked here
    text = (ROOT / "docs" / DOC).read_text()
    assert "tests/integration/test_quickstart_own_schema.py" in text
    assert re.search(r"checked-by: tests/integration/test_quickstart_own_schema.py", text)
