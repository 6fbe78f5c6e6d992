"""Load a directory of policy files into a `PolicySet`, or report every error.

Contract:

* `load_policy_set(directory)` reads every ``*.yaml`` / ``*.yml`` file of the
  directory (not recursively); the file name without extension is the agent type's
  name. It returns an immutable `PolicySet`, or raises `PolicyError` whose
  ``errors`` list every problem of every file, each naming the file, the key path
  and what was expected. A set with any error is rejected as a whole: the proxy
  keeps serving with the previous set (SIGHUP reload) or does not start.
* Duplicate YAML keys are errors (PyYAML would silently keep the last one, turning a
  second ``customers:`` entry into a policy change nobody reviewed).
* Across files: type names must be unique, one upstream role serves one type, and
  no agent id may match the patterns of two types (decided exactly, with an example
  id in the message).
* `PolicySet.match(agent_id)` returns the policy of the agent's type, or None (the
  proxy refuses agents that match no type).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from .agent import AgentPolicy, key_path
from .checks import compile_policy
from .errors import PolicyError
from .globs import matches, overlap
from .models import PolicyDocument

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class PolicySet:
    """All agent types' policies; immutable (reload builds a new set)."""

    policies: tuple[AgentPolicy, ...]
    directory: Path
    _matches: dict[str, AgentPolicy | None] = field(default_factory=dict, repr=False, compare=False)

    def __iter__(self) -> Iterator[AgentPolicy]:
        return iter(self.policies)

    def __len__(self) -> int:
        return len(self.policies)

    def __hash__(self) -> int:
        return id(self)

    def get(self, name: str) -> AgentPolicy | None:
        """The policy of an agent type, by type name."""
        for policy in self.policies:
            if policy.name == name:
                return policy
        return None

    def match(self, agent_id: str) -> AgentPolicy | None:
        """The policy whose `agents` patterns match `agent_id` (at most one can)."""
        found = self._matches.get(agent_id, False)
        if found is not False:
            return found  # type: ignore[return-value]
        result: AgentPolicy | None = None
        for policy in self.policies:
            if any(matches(p, agent_id) for p in policy.agents):
                result = policy
                break
        if len(self._matches) < 100_000:  # agent ids are few; bound it anyway
            self._matches[agent_id] = result
        return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys in a mapping."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", mark)
        seen.add(key)
    return dict(loader.construct_mapping(node, deep=deep))


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_policy_set(directory: str | Path) -> PolicySet:
    """Load and check every policy file of `directory` (see the module docstring)."""
    root = Path(directory)
    if not root.is_dir():
        raise PolicyError([f"{root}: not a directory"])
    files = sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    if not files:
        raise PolicyError([f"{root}: no policy files (*.yaml, one per agent type)"])
    errors: list[str] = []
    policies: list[AgentPolicy] = []
    for path in files:
        policy = _load_file(path, errors)
        if policy is not None:
            policies.append(policy)
    errors.extend(_cross_checks(policies))
    if errors:
        raise PolicyError(errors)
    return PolicySet(policies=tuple(policies), directory=root)


def _load_file(path: Path, errors: list[str]) -> AgentPolicy | None:
    name = path.stem
    if not _TYPE_NAME.match(name):
        errors.append(
            f"{path}: the file name is the agent type's name: use lower-case letters, "
            f"digits, '_' and '-' (got {name!r})"
        )
        return None
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(f"{path}: cannot read: {exc}")
        return None
    except yaml.YAMLError as exc:
        errors.append(f"{path}: {_yaml_problem(exc)}")
        return None
    if data is None:
        errors.append(f"{path}: the file is empty (expected agents, upstream_role, ...)")
        return None
    if not isinstance(data, dict):
        errors.append(f"{path}: expected a mapping of policy keys at the top level")
        return None
    try:
        doc = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        errors.extend(f"{path}: {problem}" for problem in _pydantic_problems(exc))
        return None
    policy, problems = compile_policy(name, path, doc)
    errors.extend(f"{path}: {where}: {what}" for where, what in problems)
    return policy


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"invalid YAML: {problem}"


def _pydantic_problems(exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = key_path(*loc) if loc else "(top level)"
        kind = err["type"]
        got = err.get("input")
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
            out.append(f"{where}: unknown key{hint}")
        elif kind == "missing":
            out.append(f"{where}: required key is missing")
        elif kind == "literal_error":
            expected = str(err.get("ctx", {}).get("expected", "")).replace("'", "")
            expected = expected.replace(" or ", ", ")
            out.append(f"{where}: expected one of {expected}; got {got!r}")
        elif kind == "value_error":
            message = str(err["msg"]).removeprefix("Value error, ")
            out.append(f"{where}: {message}")
        else:
            out.append(f"{where}: {str(err['msg']).lower()}; got {got!r}")
    return out


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
            if len(args) != 1:
                return tp
        else:
            return tp


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the model at `loc` accepts, for 'unknown key' messages."""
    tp: Any = PolicyDocument
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return []
            tp = info.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _cross_checks(policies: list[AgentPolicy]) -> list[str]:
    errors: list[str] = []
    by_name: dict[str, AgentPolicy] = {}
    by_role: dict[str, AgentPolicy] = {}
    for policy in policies:
        if policy.name in by_name:
            errors.append(
                f"{policy.source}: agent type {policy.name!r} is also defined by "
                f"{by_name[policy.name].source}"
            )
        by_name.setdefault(policy.name, policy)
        other = by_role.get(policy.upstream_role)
        if other is not None:
            errors.append(
                f"{policy.source}: upstream_role: {policy.upstream_role!r} is also the role of "
                f"{other.name} ({other.source}); give each agent type its own role"
            )
        by_role.setdefault(policy.upstream_role, policy)
    for i, first in enumerate(policies):
        for second in policies[i + 1 :]:
            for p in first.agents:
                for q in second.agents:
                    example = overlap(p, q)
                    if example is not None:
                        errors.append(
                            f"{second.source}: agents: pattern {q!r} of {second.name} overlaps "
                            f"{p!r} of {first.name} ({first.source}): an agent id such as "
                            f"{example!r} would match both types"
                        )
    return errors
