"""Docs and deploy files generated from the code, so they cannot drift from it.

* the settings table of ``docs/configuration.md`` (between ``<!-- settings:begin -->``
  and ``<!-- settings:end -->``), from `guardproxy.config.Settings`: every setting,
  its default, its environment variable and its description;
* ``docs/cli.md``, from the ``guardproxy`` command itself: every command and option;
* ``deploy/kubernetes/configmap-policies.yaml``, from ``policies/``: the example
  policies, byte for byte.

``scripts/docgen`` rewrites them; `tests/unit/test_docs_generated.py` fails when a
file differs from what this module generates (run ``scripts/docgen`` and commit).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
CLI_DOC = ROOT / "docs" / "cli.md"
CONFIGMAP = ROOT / "deploy" / "kubernetes" / "configmap-policies.yaml"
POLICIES = ROOT / "policies"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return "none" if not value else ", ".join(map(str, value))
    return f"`{value}`"


def settings_table() -> str:
    from guardproxy.config import ENV_PREFIX, Settings

    lines = ["| setting | default | environment | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(
            f"| `{name}` | {_default(default)} | `{ENV_PREFIX}{name.upper()}` | {meaning} |"
        )
    return "\n".join(lines)


def configuration_md(current: str) -> str:
    head, _, rest = current.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


# typer bundles its own click: commands, groups and parameters are read by duck typing
Command = Any


def _is_option(param: Any) -> bool:
    return getattr(param, "param_type_name", "") == "option"


def _option_row(param: Any) -> str:
    names = ", ".join(f"`{o}`" for o in param.opts + param.secondary_opts)
    if param.envvar:
        names += f" (env `{param.envvar}`)"
    default = param.default
    shown = "" if param.is_flag or default is None or default == () else f"`{default}`"
    meaning = (param.help or "").replace("|", "\\|").replace("\n", " ")
    return f"| {names} | {shown} | {meaning} |"


def _command_doc(path: str, command: Command) -> list[str]:
    lines = [f"### `{path}`", ""]
    help_text = (command.help or "").strip()
    if help_text:
        lines += [help_text.replace("\b\n", ""), ""]
    arguments = [p for p in command.params if getattr(p, "param_type_name", "") == "argument"]
    if arguments:
        lines.append(
            "Arguments: "
            + ", ".join(f"`{a.name.upper() if a.name else ''}`" for a in arguments)
            + "."
        )
        lines.append("")
    options = [p for p in command.params if _is_option(p) and p.name != "help"]
    if options:
        lines += ["| option | default | meaning |", "|---|---|---|"]
        lines += [_option_row(p) for p in options]
        lines.append("")
    return lines


def _walk(path: str, command: Command) -> list[tuple[str, Command]]:
    if hasattr(command, "commands"):
        out: list[tuple[str, Command]] = []
        for name in sorted(command.commands):
            out += _walk(f"{path} {name}", command.commands[name])
        return out
    return [(path, command)]


def cli_md() -> str:
    from guardproxy.cli import app

    root = typer.main.get_command(app)
    lines = [
        "# Command-line reference",
        "",
        "Every command and option of `guardproxy`, generated from the command itself",
        "(`scripts/docgen`; a test fails when this page and the command differ). The",
        "settings of `guardproxy serve` are explained in [configuration.md](configuration.md).",
        "",
    ]
    for path, command in _walk("guardproxy", root):
        lines += _command_doc(path, command)
    return "\n".join(lines).rstrip() + "\n"


def configmap_policies(current: str) -> str:
    head = current[: current.index("apiVersion:")]
    lines = [
        head.rstrip("\n"),
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: guardproxy-policies",
        "  namespace: guardproxy",
        "  labels:",
        "    app.kubernetes.io/name: guardproxy",
        "    app.kubernetes.io/part-of: guardproxy",
        "data:",
    ]
    for path in sorted(POLICIES.glob("*.yaml")):
        lines.append(f"  {path.name}: |")
        for line in path.read_text(encoding="utf-8").rstrip("\n").split("\n"):
            lines.append(f"    {line}" if line else "")
    return "\n".join(lines) + "\n"


def generated() -> dict[Path, str]:
    return {
        CONFIGURATION: configuration_md(CONFIGURATION.read_text(encoding="utf-8")),
        CLI_DOC: cli_md(),
        CONFIGMAP: configmap_policies(CONFIGMAP.read_text(encoding="utf-8")),
    }


def main(argv: list[str]) -> int:
    stale = []
    for path, text in generated().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
            if "--check" not in argv:
                path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if '--check' in argv else 'wrote'}: {path.relative_to(ROOT)}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
