"""Every code example of docs/*.md is checked, each the way its marker says
(`tests/docexamples.py`): commands run offline with their output compared, denials
re-derived with ``guardproxy explain``, YAML validated as policies or settings, SQL
parsed, ``guardproxy`` command lines checked against the real command and options.
The examples that need a database run in tests/integration/test_docs_live.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

import docexamples as dx
import pglast
import pytest
import typer
import yaml

from guardproxy.config import Settings
from guardproxy.policy.checks import compile_policy
from guardproxy.policy.models import PolicyDocument

BLOCKS = list(dx.blocks())
LIVE_TESTS = dx.ROOT / "tests" / "integration" / "test_docs_live.py"


def run(argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """A guardproxy command, offline, in the repository; its stdout then stderr lines."""
    assert argv and argv[0] == "guardproxy", argv
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GUARDPROXY_")}
    clean.update(env or {}, COLUMNS="80", NO_COLOR="1")
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", *argv[1:]],
        capture_output=True,
        text=True,
        cwd=dx.ROOT,
        env=clean,
        timeout=60,
        check=False,
    )
    return (out.stdout + out.stderr).rstrip("\n").split("\n")


def _env(argument: str) -> dict[str, str]:
    words = shlex.split(argument)
    pairs = words[words.index("env") + 1 :] if "env" in words else []
    return dict(p.split("=", 1) for p in pairs)


def check_run(block: dx.Block) -> None:
    if block.argument.startswith("live"):
        assert LIVE_TESTS.exists(), f"{block.where}: live examples run in {LIVE_TESTS}"
        return
    assert block.argument.startswith("offline"), f"{block.where}: run: offline or run: live"
    sessions = dx.sessions(block)
    assert sessions, f"{block.where}: a run block shows `$ guardproxy ...` and its output"
    for session in sessions:
        actual = run(session.argv, _env(block.argument))
        assert dx.matches(session.expected, actual), (
            f"{block.where}: `{shlex.join(session.argv)}` printed\n"
            + "\n".join(actual)
            + "\n--- but the doc shows ---\n"
            + "\n".join(session.expected)
        )


def check_excerpt(block: dx.Block) -> None:
    actual = run(shlex.split(block.argument))
    missing = dx.in_order(block.body, actual)
    assert not missing, (
        f"{block.where}: not in the output of `{block.argument}` (in this order): {missing}"
    )


def check_denial(block: dx.Block) -> None:
    actual = run(["guardproxy", "explain", *shlex.split(block.argument)])
    fields = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in actual if ": " in line}
    shown = [line for line in block.body if line.strip()]
    message = shown[0].removeprefix("ERROR:").strip()
    assert fields.get("reason") == message, f"{block.where}: explain says\n" + "\n".join(actual)
    hint = next((line for line in shown[1:] if line.startswith("HINT:")), None)
    if hint is not None:
        assert fields.get("hint") == hint.removeprefix("HINT:").strip(), (
            f"{block.where}: explain says\n" + "\n".join(actual)
        )


def check_yaml(block: dx.Block) -> None:
    settings = set(Settings.model_fields)
    policy = set(PolicyDocument.model_fields)
    for doc in yaml.safe_load_all("\n".join(block.body)):
        if not isinstance(doc, dict) or "apiVersion" in doc:
            continue  # another tool's file (Kubernetes, Prometheus): it parses
        keys = set(doc)
        if keys <= settings:
            Settings.model_validate(doc)
        elif keys <= policy:
            full: dict[str, Any] = {
                "agents": ["example-*"],
                "upstream_role": "guard_example",
                "statements": ["read", "write", "ddl", "admin", "code", "notify"],
                **doc,
            }
            parsed = PolicyDocument.model_validate(full)
            _, problems = compile_policy("example", dx.ROOT / "example.yaml", parsed)
            assert not problems, f"{block.where}: {problems}"
        elif keys & (settings | policy):
            pytest.fail(f"{block.where}: mixes keys of settings and of policies: {sorted(keys)}")


def check_sql(block: dx.Block) -> None:
    pglast.parse_sql("\n".join(block.body))


def _command_tree() -> Any:
    from guardproxy.cli import app

    return typer.main.get_command(app)


def check_command_line(where: str, words: list[str]) -> None:
    command = _command_tree()
    rest = words[1:]
    path = ["guardproxy"]
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        path.append(rest[0])
        command = command.commands[rest[0]]
        rest = rest[1:]
    assert not hasattr(command, "commands"), f"{where}: `{' '.join(words)}`: no such command"
    known = {
        o
        for p in command.params
        for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))
    }
    for word in rest:
        if word.startswith("-") and word not in ("-", "--"):
            option = word.split("=", 1)[0]
            assert option in known, f"{where}: `{' '.join(path)}` has no option {option}"


def check_sh(block: dx.Block) -> None:
    for line in block.body:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue  # a continued line of another tool's command
        if words and words[0].rsplit("/", 1)[-1] == "guardproxy":
            check_command_line(block.where, words)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_doc_example(block: dx.Block) -> None:
    if block.marker == "run":
        check_run(block)
    elif block.marker == "excerpt of":
        check_excerpt(block)
    elif block.marker == "denial":
        check_denial(block)
    elif block.marker == "checked-by":
        path = dx.ROOT / block.argument.split("::")[0]
        assert path.exists(), f"{block.where}: {path} does not exist"
        assert block.doc.name in path.read_text(), f"{block.where}: {path} does not check it"
    elif block.marker == "not-run":
        assert block.argument, f"{block.where}: say why it is not run"
    elif block.marker:
        pytest.fail(f"{block.where}: unknown marker {block.marker!r}")
    elif block.lang == "yaml":
        check_yaml(block)
    elif block.lang == "sql":
        check_sql(block)
    elif block.lang == "sh":
        check_sh(block)
    else:
        pytest.fail(
            f"{block.where}: an unmarked block without a language: mark how it is checked "
            "(run, excerpt of, denial, checked-by) or why not (not-run), see tests/docexamples.py"
        )


def test_the_markers_read_what_they_say() -> None:
    assert dx.matches(["a", "...", "c"], ["a", "b", "b", "c"])
    assert not dx.matches(["a", "c"], ["a", "b", "c"])
    assert dx.matches(["x ..."], ["x y z"])
    assert dx.in_order(["a", "...", "c"], ["a", "b", "c"]) == []
    assert dx.in_order(["c", "a"], ["a", "b", "c"]) == ["a"]


# ---------------------------------------------------------------- blocks checked here


def _check_in(directory: Any, change: Any) -> list[str]:
    import shutil

    shutil.copytree(dx.ROOT / "policies", directory / "policies")
    change(directory / "policies")
    out = subprocess.run(
        [sys.executable, "-m", "guardproxy", "check", "--policies", "policies"],
        capture_output=True,
        text=True,
        cwd=directory,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    return out.stderr.rstrip("\n").split("\n")


def test_the_check_error_examples_of_policies_md(tmp_path: Any) -> None:
    def typo_and_no_write(policies: Any) -> None:
        analytics = policies / "analytics.yaml"
        analytics.write_text(
            analytics.read_text().replace("  customers:\n    ops:", "  customers:\n    opz:", 1)
        )
        support = policies / "support.yaml"
        support.write_text(
            support.read_text().replace("statements: [read, write]", "statements: [read]")
        )

    shown = dx.block_starting("policies.md", "policy check failed: 4 errors").body
    assert _check_in(tmp_path / "a", typo_and_no_write) == shown

    def overlapping(policies: Any) -> None:
        (policies / "admin.yaml").write_text(
            'agents: ["analytics-admin"]\nupstream_role: guard_admin\n'
        )

    shown = dx.block_starting("policies.md", "policy check failed: 1 error").body
    assert _check_in(tmp_path / "b", overlapping) == shown


def test_the_image_settings_of_deployment_md_are_the_dockerfiles() -> None:
    shown = dict(
        pair.split("=", 1)
        for line in dx.block_starting("deployment.md", "GUARDPROXY_LISTEN_HOST").body
        for pair in line.split()
    )
    dockerfile = (dx.ROOT / "Dockerfile").read_text()
    for name, value in shown.items():
        assert f"{name}={value}" in dockerfile, name


def test_the_tag_of_observability_md_is_what_the_proxy_puts_first() -> None:
    from guardproxy.relay.judging import sqlcomment

    line = dx.block_starting("observability.md", "/*agent=").body[0]
    statement = line.partition("*/ ")[2]
    tag = sqlcomment(
        {"agent": "analytics-9", "agent_type": "analytics", "task": "report-5", "step": "2"}
    )
    assert f"{tag.decode()} {statement}" == line
