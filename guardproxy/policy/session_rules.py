"""Rules for run-time settings, whatever syntax or channel changes them.

Applied to every `SettingChange` (SET, SET LOCAL, RESET, BEGIN / SET TRANSACTION
modes, SET SESSION CHARACTERISTICS, set_config() when a policy allows it) and to
the startup parameters of a client connection (`startup_violation`):

* identity: ``role`` and ``session_authorization`` cannot be set (RESET is fine:
  it returns to the upstream role). ``session_replication_role`` (disables
  triggers) and the ``*_preload_libraries`` settings neither;
* name resolution: ``search_path`` cannot be set (RESET / DEFAULT is fine): the
  policy's unqualified names are resolved with the upstream search path;
* lexing: ``standard_conforming_strings`` stays on and ``client_encoding`` stays
  UTF8, ``backslash_quote`` unchanged: otherwise the server could read string
  literals differently from the parser that judged them;
* timeouts: a timeout the policy sets may be lowered, never raised nor disabled (0);
* read-only: a read-only policy cannot turn ``transaction_read_only`` or
  ``default_transaction_read_only`` off (``BEGIN READ WRITE`` included);
* ``settings.deny`` of the policy.

``guard.*`` settings are session context, not Postgres settings: the engine turns
``SET`` / ``RESET`` of them into context updates before these rules run; any other
change of a ``guard.*`` name (``set_config('guard.principals', ...)``) is refused, and
`forwarded_guard_violation` refuses a message that would carry ``SET guard.token`` or
a change of a setting guardproxy sets in Postgres (``guard.principals``, ``guard.task``,
``guard.token_id``: docs/delegation.md) to the server among other statements.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..analysis.model import SettingChange
from .agent import AgentPolicy
from .decision import SQLSTATE_INVALID_PARAMETER_VALUE
from .durations import parse_setting_ms
from .rules import Violation

FIXED_SETTINGS = {
    "role": "the agent type's upstream role is fixed",
    "session_authorization": "the agent type's upstream role is fixed",
    "session_replication_role": "it would disable triggers and rules",
    "local_preload_libraries": "it loads server code",
    "session_preload_libraries": "it loads server code",
    "search_path": "table names are resolved with the upstream search path",
    "backslash_quote": "string literals must be read the way guardproxy parsed them",
}
_POLICY_KEYS = {
    "statement_timeout": "timeouts.statement_timeout",
    "idle_in_transaction_session_timeout": "timeouts.idle_in_transaction_timeout",
    "transaction_timeout": "timeouts.transaction_timeout",
}
_UTF8 = {"utf8", "unicode"}


def _is_utf8(text: str) -> bool:
    """UTF8 however a client spells it: Postgres ignores case and non-alphanumerics in
    encoding names, and asyncpg sends ``'utf-8'`` quoted."""
    name = "".join(ch for ch in text.lower() if ch.isascii() and ch.isalnum())
    return name in _UTF8


_READ_ONLY = {"transaction_read_only", "default_transaction_read_only"}
_LEXICAL = {"standard_conforming_strings", "client_encoding", "names"}


def parse_bool(text: str) -> bool | None:
    """A boolean as Postgres' parse_bool reads it (unique prefixes), or None."""
    value = text.strip().lower()
    if not value:
        return None
    if "true".startswith(value) or "yes".startswith(value) or value in ("on", "1"):
        return True
    if "false".startswith(value) or "no".startswith(value) or value in ("off", "of", "0"):
        return False
    return None


def setting_violation(policy: AgentPolicy, change: SettingChange) -> Violation | None:
    """The rule a setting change breaks, or None (``guard.*`` excluded: see module doc).

    Only settings some rule governs need a constant value: ``set_config('jit', $1,
    false)`` (asyncpg sends it) is fine, ``set_config('statement_timeout', $1, false)``
    is not, since nobody can tell what it will set.
    """
    name = change.name
    rule_prefix = f"(policy {policy.name}, settings"
    if name is None:
        return Violation(
            rule="settings",
            reason=f"{policy.name} may not change a setting whose name is not a constant "
            f"{rule_prefix})",
            hint="use SET name = value with a literal name",
        )
    if name.startswith("guard."):
        # SET guard.* is guardproxy's context (the engine takes it before these rules);
        # any other way reaches Postgres, where guard.principals / task / token_id hold
        # what guardproxy verified for row-level security
        return Violation(
            rule="settings.guard",
            reason=f"{policy.name} may not change {name} with {change.via}: guard.* settings "
            f"are guardproxy's session context {rule_prefix}.guard)",
            hint=f"SET {name} = '...' as a statement of its own",
        )
    if change.action != "set":
        return None  # RESET / DEFAULT / FROM CURRENT return to values the policy set
    why = FIXED_SETTINGS.get(name)
    if why is not None:
        return Violation(
            rule=f"settings.{name}",
            reason=f"{policy.name} may not set {name}: {why} {rule_prefix}.{name})",
            hint=f"RESET {name} is allowed; ask for a policy change if {policy.name} needs another value",
        )
    if name in policy.denied_settings:
        return Violation(
            rule="settings.deny",
            reason=f"{policy.name} may not set {name} {rule_prefix}.deny)",
            hint=f"settings denied to {policy.name}: {', '.join(sorted(policy.denied_settings))}",
        )
    limit = policy.timeout_limits_ms().get(name)
    governed = limit is not None or name in _LEXICAL or (name in _READ_ONLY and policy.read_only)
    if not governed:
        return None
    if change.values is None:
        return Violation(
            rule=f"settings.{name}",
            reason=f"{policy.name} may not set {name} to a value that is not a constant "
            f"{rule_prefix}.{name})",
            hint="use a literal value",
            sqlstate=SQLSTATE_INVALID_PARAMETER_VALUE,
        )
    text = ",".join(change.values)
    shown = f"{name} = {text}"
    if name == "standard_conforming_strings" and parse_bool(text) is not True:
        return Violation(
            rule="settings.standard_conforming_strings",
            reason=f"{policy.name} may not turn standard_conforming_strings off: string literals "
            f"must be read the way guardproxy parsed them {rule_prefix}.standard_conforming_strings)",
            hint="use E'...' strings for backslash escapes",
        )
    if name in ("client_encoding", "names") and not _is_utf8(text):
        return Violation(
            rule="settings.client_encoding",
            reason=f"{policy.name} may not set client_encoding to {text}: guardproxy reads "
            f"statements as UTF8 {rule_prefix}.client_encoding)",
            hint="client_encoding UTF8 is allowed",
        )
    if limit is not None:
        ms = parse_setting_ms(text)
        key = _POLICY_KEYS[name]
        if ms is None or ms <= 0 or ms > limit:
            return Violation(
                rule=key,
                reason=f"{policy.name} may not set {shown}: the policy limits {name} to "
                f"{limit}ms (policy {policy.name}, {key})",
                hint=f"values from 1ms to {limit}ms are allowed",
            )
    if name in _READ_ONLY and policy.read_only and parse_bool(text) is not True:
        return Violation(
            rule="statements",
            reason=f"{policy.name} may not set {shown}: the agent type is read-only "
            f"(policy {policy.name}, statements)",
            hint=f"{policy.name} may only read; READ ONLY transactions are allowed",
        )
    return None


def startup_changes(
    params: Mapping[str, str],
) -> tuple[list[SettingChange], dict[str, str], list[str]]:
    """Setting changes, guard.* context and problems from startup parameters.

    ``user`` and ``database`` are the proxy's business; ``options`` is split like
    the server does (`split_options`); ``replication`` must be off.
    """
    changes: list[SettingChange] = []
    context: dict[str, str] = {}
    problems: list[str] = []
    items: list[tuple[str, str]] = []
    for key, value in params.items():
        lowered = key.lower()
        if lowered in ("user", "database", "application_name"):
            continue
        if lowered == "replication":
            if parse_bool(value) is not False:
                problems.append("replication connections are not allowed")
            continue
        if lowered == "options":
            parsed = split_options(value)
            if parsed is None:
                problems.append(f"cannot read the options parameter {value!r}")
            else:
                items.extend(parsed)
            continue
        items.append((lowered, value))
    for name, value in items:
        if name.startswith("guard."):
            context[name] = value
        else:
            changes.append(SettingChange(name=name, action="set", values=(value,), via="startup"))
    return changes, context, problems


#: What the server's isspace() (C locale) sees as whitespace in ``options``.
_OPTION_SPACE = frozenset(" \t\n\v\f\r")


def split_option_words(value: str) -> list[str]:
    """The words of a startup ``options`` string exactly as Postgres splits them
    (``pg_split_opts``): ASCII whitespace separates, a backslash makes the next
    character literal (a space, a backslash), quotes are ordinary characters, and
    non-ASCII spaces (U+00A0...) belong to the word."""
    words: list[str] = []
    word: list[str] = []
    escaped = in_word = False
    for ch in value:
        if ch in _OPTION_SPACE and not escaped:
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
            continue
        in_word = True
        if not escaped and ch == "\\":
            escaped = True
        else:
            escaped = False
            word.append(ch)
    if in_word:
        words.append("".join(word))
    return words


def split_options(value: str) -> list[tuple[str, str]] | None:
    """The settings of a startup ``options`` string as the server applies them:
    ``-c name=value``, ``-cname=value`` and ``--name=value`` (name lower-cased, ``-``
    as ``_``); None when it holds anything else (other backend switches, a switch
    without a value). The proxy must apply exactly these, or judge and server would
    read two different sets of settings."""
    words = split_option_words(value)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            assignment, i = words[i + 1], i + 2
        elif (word.startswith("-c") and len(word) > 2) or (word.startswith("--") and len(word) > 2):
            assignment, i = word[2:], i + 1
        else:
            return None  # other backend switches (-d, -o, ...) have no business here
        name, sep, setting = assignment.partition("=")
        if not sep or not name:
            return None
        out.append((name.lower().replace("-", "_"), setting))
    return out


#: guard.* names guardproxy sets in Postgres itself (row-level security reads them:
#: guardproxy/delegation/postgres.py), and the delegation token, which must never reach
#: the server.
PROXY_OWNED = frozenset({"guard.principals", "guard.task", "guard.token_id", "guard.token"})


def forwarded_guard_violation(policy: AgentPolicy, names: Iterable[str]) -> Violation | None:
    """The rule broken by a message that is sent to the server and SETs / RESETs these
    guard.* `names` among its statements (a message of only SET guard.* never is)."""
    owned = sorted(n for n in names if n.lower() in PROXY_OWNED)
    if not owned:
        return None
    name = owned[0]
    why = (
        "the delegation token would reach Postgres and its logs"
        if name.lower() == "guard.token"
        else f"the message would reach Postgres, where guardproxy sets {name} itself"
    )
    return Violation(
        rule="settings.guard",
        reason=f"{policy.name} may not send SET {name} together with other statements: "
        f"{why} (policy {policy.name}, settings.guard)",
        hint=f"send SET {name} = '...' as a message of its own",
    )
