"""Where a key of a YAML file is: its line, for messages like ``support.yaml:14: ...``.

`key_lines(text)` maps every key path of the document to the 1-based line of the
key (of the item, for a sequence item): ``("tables", "orders", "ops", 1)`` -> 12.
`line_of(lines, path)` finds the line of a path, or of its nearest ancestor that is
in the file (a problem with a key the file does not write, such as a default, is
reported at the entry that would hold it).
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

Path = tuple[str | int, ...]


def key_lines(text: str) -> dict[Path, int]:
    """Every key path of the YAML document `text` and its line; {} if it does not parse."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[Path, int] = {}

    def walk(node: yaml.Node, path: Path) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*path, str(key.value))
                out.setdefault(here, key.start_mark.line + 1)
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                here = (*path, index)
                out.setdefault(here, item.start_mark.line + 1)
                walk(item, here)

    if root is not None:
        walk(root, ())
    return out


def line_of(lines: dict[Path, int], path: Sequence[str | int]) -> int | None:
    """The line of `path`, or of its nearest ancestor present; None for neither."""
    parts = tuple(path)
    while parts:
        if parts in lines:
            return lines[parts]
        parts = parts[:-1]
    return None
