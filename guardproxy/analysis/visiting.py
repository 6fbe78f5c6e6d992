"""`FastVisitor`: pglast's `Visitor` with its method table built once per class.

pglast's `Visitor.__call__` rebuilds the ``visit_<Node>`` dispatch table with
`inspect.getmembers` on every call (about 14 us), which is a tenth of the cost of
judging a short statement. The traversal itself (`Visitor.iterate`, breadth first,
with ancestors and replacement actions) is pglast's, unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pglast import ast
from pglast.visitors import Continue, Visitor


class FastVisitor(Visitor):
    _tables: ClassVar[dict[type, dict[type, str]]] = {}

    def __call__(self, node: Any) -> Any:
        self.root = node
        cls = type(self)
        table = FastVisitor._tables.get(cls)
        if table is None:
            table = {}
            for name in dir(cls):
                if name.startswith("visit_"):
                    node_class = getattr(ast, name[6:], None)
                    if node_class is not None:
                        table[node_class] = name
            FastVisitor._tables[cls] = table
        default = self.visit  # may be None in a subclass: then nodes without a method are skipped
        generator = self.iterate(node)
        try:
            ancestors, current = generator.send(None)
        except StopIteration:
            return self.root
        while True:
            method_name = table.get(current.__class__)
            method = getattr(self, method_name) if method_name is not None else default
            result = method(ancestors, current) if method is not None else None
            try:
                ancestors, current = generator.send(Continue if result is None else result)
            except StopIteration:
                break
        return self.root
