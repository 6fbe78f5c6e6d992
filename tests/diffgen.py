"""Hypothesis strategies for the differential tests: protocol scripts a client could send.

``scripts(pool)`` draws one script (see diffwire.py): one to four batches, each
sent at once, each a few *actions*: a simple Query; a Parse, Bind, Describe,
Execute (with or without a row limit), Close, Flush or Sync on its own; the usual
Parse/Bind/Describe/Execute/Sync round of a driver; an Execute of a SQL cursor's
portal; and, between batches, another client taking the server (``Steal``) and
giving it back (``Give``). Names are few (statements ``""``, ``s1``, ``s2``;
portals ``""``, ``p1`` and the cursor ``c1``) so that they are reused with other
texts, closed and parsed again. A batch ends with a Sync, a Query or a Flush.

The SQL comes from a ``Pool`` of texts, each with its parameter count and what it
is (rows, a write, an error at parse or at run time, transaction control, a
cursor, COPY out or in, a setting...). The generator keeps a conservative model of
which texts each statement and portal may hold, only to pick parameter counts and
to follow every Execute that may run ``COPY ... FROM STDIN`` with COPY data (the
server would wait for it otherwise); the scripts themselves may be wrong on
purpose (a wrong parameter count, a value that is not a number, a portal or
statement that does not exist).

Hypothesis draws the low end of a range more often than the rest, so a rare choice
is written as the top of its range (``integers(0, 19) == 19``), never as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffwire import (
    Batch,
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    Give,
    Parse,
    Query,
    Script,
    Steal,
    Step,
    Sync,
)
from hypothesis import strategies as st


@dataclass(frozen=True)
class Text:
    sql: str
    params: int = 0
    kind: str = "rows"  # rows, write, parse_error, run_error, tx, cursor, copy_out, copy_in, ...


@dataclass(frozen=True)
class Pool:
    """SQL texts for scripts: ``texts`` go anywhere, ``simple_only`` only in a Query."""

    texts: tuple[Text, ...]
    simple_only: tuple[Text, ...] = ()
    copy_rows: tuple[str, ...] = ()  # CopyData payloads for the COPY FROM texts
    values: tuple[str | None, ...] = ("1", "2", "3", "4", "5", "6", "10", "-3", "abc", None)


# ---------------------------------------------------------------- the difftest schema

DIFF_POOL = Pool(
    texts=(
        # rows
        Text("SELECT id, name, qty FROM items ORDER BY id"),
        Text("SELECT id, name FROM items WHERE id = $1", 1),
        Text("SELECT id, qty FROM items WHERE qty > $1 ORDER BY id", 1),
        Text("SELECT count(*) AS n FROM events"),
        Text("SELECT i.name, e.kind FROM items i JOIN events e ON e.item_id = i.id ORDER BY e.id"),
        Text("VALUES (1, 'one'), (2, 'two'), (3, 'three')"),
        Text("SELECT $1::int + $2::int AS total", 2),
        Text("SELECT n FROM generate_series(1, 7) AS n"),
        Text("SELECT DATE '2024-03-05'::text AS d, TIMESTAMPTZ '2024-01-01 12:00+00'::text AS t"),
        Text("SHOW DateStyle", kind="setting"),
        # writes
        Text("UPDATE items SET qty = qty + 1 WHERE id = $1", 1, "write"),
        Text("UPDATE items SET qty = qty + 1 WHERE id <= 3 RETURNING id, qty", 0, "write"),
        Text("INSERT INTO events (id, item_id, kind) VALUES ($1, $2, 'gen')", 2, "write"),
        Text("DELETE FROM events WHERE id = $1", 1, "write"),
        Text("DELETE FROM events WHERE item_id = $1 RETURNING id, kind", 1, "write"),
        Text(
            "INSERT INTO items (id, name, qty) VALUES ($1, 'new', 0) ON CONFLICT (id) DO NOTHING",
            1,
            "write",
        ),
        Text(
            "INSERT INTO items (id, name, qty) SELECT id + 100, name, qty FROM items WHERE id < $1",
            1,
            "write",
        ),
        # errors at run time
        Text("UPDATE items SET qty = qty - 10 WHERE id = $1", 1, "run_error"),
        Text("SELECT id / (qty - qty) AS boom FROM items ORDER BY id", 0, "run_error"),
        Text("INSERT INTO events (id, item_id, kind) VALUES (1, 1, 'again')", 0, "run_error"),
        Text("SELECT $1::int / 0 AS boom", 1, "run_error"),
        # errors at parse time
        Text("SELEC id FROM items", 0, "parse_error"),
        Text("SELECT nosuch FROM items", 0, "parse_error"),
        Text("SELECT * FROM no_such_table", 0, "parse_error"),
        # transactions
        Text("BEGIN", kind="tx"),
        Text("BEGIN ISOLATION LEVEL REPEATABLE READ", kind="tx"),
        Text("COMMIT", kind="tx"),
        Text("ROLLBACK", kind="tx"),
        Text("SAVEPOINT sp", kind="tx"),
        Text("ROLLBACK TO SAVEPOINT sp", kind="tx"),
        Text("RELEASE SAVEPOINT sp", kind="tx"),
        # cursors
        Text("DECLARE c1 CURSOR FOR SELECT id, name FROM items ORDER BY id", kind="cursor"),
        Text(
            "DECLARE c1 SCROLL CURSOR FOR SELECT n FROM generate_series(1, 6) AS n", kind="cursor"
        ),
        Text("FETCH 2 FROM c1", kind="cursor"),
        Text("FETCH ALL FROM c1", kind="cursor"),
        Text("MOVE 1 IN c1", kind="cursor"),
        Text("CLOSE c1", kind="cursor"),
        # COPY
        Text("COPY items (id, name, qty) TO STDOUT", kind="copy_out"),
        Text("COPY (SELECT id, kind FROM events ORDER BY id) TO STDOUT", kind="copy_out"),
        Text("COPY events (id, item_id, kind) FROM STDIN", kind="copy_in"),
        # settings
        Text("SET DateStyle = 'SQL, DMY'", kind="setting"),
        Text("SET TimeZone = 'Asia/Tokyo'", kind="setting"),
        Text("RESET DateStyle", kind="setting"),
        Text("SET LOCAL TimeZone = 'America/Lima'", kind="setting"),
        Text("SELECT set_config('DateStyle', 'German', false) AS d", kind="setting"),
        Text("SELECT current_setting('TimeZone') AS tz", kind="setting"),
        # empty
        Text("", kind="empty"),
    ),
    simple_only=(
        Text("SELECT 1 AS a; SELECT 2 AS b"),
        Text("SELECT 1 AS a; SELECT 1 / 0; SELECT 3 AS c", kind="run_error"),
        Text(
            "UPDATE items SET qty = qty + 1 WHERE id = 2; SELECT qty FROM items WHERE id = 2",
            kind="write",
        ),
        Text("BEGIN; UPDATE items SET qty = 0 WHERE id = 5; COMMIT", kind="write"),
        Text("DO $$BEGIN RAISE NOTICE 'noticed %', 42; END$$", kind="misc"),
        Text("DEALLOCATE s1", kind="misc"),
        Text("DEALLOCATE ALL", kind="misc"),
        Text("DISCARD ALL", kind="misc"),
        Text("PREPARE q1 AS SELECT id FROM items WHERE id < 3 ORDER BY id", kind="misc"),
        Text("EXECUTE q1", kind="misc"),
        Text("LISTEN ch", kind="misc"),
        Text("NOTIFY ch, 'hello'", kind="misc"),
        Text("CREATE TEMP TABLE scratch (x int)", kind="misc"),
        Text("SELECT pg_advisory_lock(7)", kind="misc"),
        Text("DECLARE h1 CURSOR WITH HOLD FOR SELECT id FROM items ORDER BY id", kind="cursor"),
        Text("FETCH 1 FROM h1", kind="cursor"),
    ),
    copy_rows=(
        "10\t1\tcopied\n",
        "11\t3\tcopied\n",
        "x\t1\tbad\n",
        "1\t1\tdup\n",
        "12\t99\tnofk\n",
    ),
)

# ---------------------------------------------------------------- the shop, as support

# What an agent of type support sends (policies/support.yaml on sql/example_schema.sql):
# reads of orders that show deleted_at as their last column (a soft-deleted row must
# never be seen), writes the policy manages (soft deletes, capped updates, appends to
# order_state_log), writes it denies, transactions, cursors, context changes.
SHOP_POOL = Pool(
    texts=(
        Text("SELECT id, fulfillment_status FROM orders WHERE id = $1", 1),
        Text("SELECT id, fulfillment_status, deleted_at FROM orders WHERE customer_id = $1", 1),
        Text("SELECT id, deleted_at FROM orders WHERE id > $1 ORDER BY id", 1),
        Text("SELECT count(*) AS n FROM orders WHERE id > $1", 1),
        Text("SELECT order_id, new_status FROM order_state_log WHERE order_id = $1 ORDER BY id", 1),
        Text("UPDATE orders SET fulfillment_status = 'packed' WHERE id = $1", 1, "write"),
        Text(
            "UPDATE orders SET fulfillment_status = 'cancelled' WHERE customer_id = $1", 1, "write"
        ),
        Text("UPDATE orders SET fulfillment_status = 'returned' WHERE id > $1", 1, "write"),
        Text(
            "UPDATE orders SET fulfillment_status = 'pending' WHERE id > $1 RETURNING id",
            1,
            "write",
        ),
        Text("DELETE FROM orders WHERE id = $1", 1, "write"),
        Text("DELETE FROM orders WHERE customer_id = $1", 1, "write"),
        Text("DELETE FROM orders WHERE id > $1 RETURNING id", 1, "write"),
        Text(
            "INSERT INTO order_state_log (order_id, new_status, changed_by) VALUES ($1, 'noted', 'diff')",
            1,
            "write",
        ),
        Text("UPDATE orders SET fulfillment_status = 'lost' WHERE id = $1", 1, "run_error"),
        Text("UPDATE orders SET tracking_number = 'x' WHERE id = $1", 1, "denied"),
        Text("DELETE FROM order_state_log WHERE order_id = $1", 1, "denied"),
        Text("SELECT card_last4 FROM payments WHERE id = $1", 1, "denied"),
        Text("UPDATE orders SET fulfillment_status = 'packed'", 0, "denied"),
        Text("BEGIN", kind="tx"),
        Text("COMMIT", kind="tx"),
        Text("ROLLBACK", kind="tx"),
        Text("SAVEPOINT sp", kind="tx"),
        Text("ROLLBACK TO SAVEPOINT sp", kind="tx"),
        Text("DECLARE c1 CURSOR FOR SELECT id, deleted_at FROM orders ORDER BY id", kind="cursor"),
        Text("FETCH 2 FROM c1", kind="cursor"),
    ),
    simple_only=(
        Text("SET guard.step = 'a'", kind="setting"),
        Text("SET guard.step = 'b'", kind="setting"),
    ),
    values=("1", "2", "3", "4", "5", "6", "0", "9", "1", "2", "3", "4", None, "x"),
)

STATEMENTS = ("", "s1", "s2")
PORTALS = ("", "p1")
CURSOR = "c1"


# ---------------------------------------------------------------- the model


@dataclass
class Model:
    """Which texts each name may hold (never forgets: conservative)."""

    statements: dict[str, set[Text]] = field(default_factory=dict)
    portals: dict[str, set[Text]] = field(default_factory=dict)

    def parsed(self, name: str, text: Text) -> None:
        self.statements.setdefault(name, set()).add(text)

    def bound(self, portal: str, statement: str) -> None:
        self.portals.setdefault(portal, set()).update(self.statements.get(statement, ()))

    def params(self, statement: str) -> int:
        texts = self.statements.get(statement)
        return max((t.params for t in texts), default=0) if texts else 0

    def may_copy_in(self, portal: str) -> bool:
        return any(t.kind == "copy_in" for t in self.portals.get(portal, ()))


# ---------------------------------------------------------------- strategies


class Builder:
    """Draws the steps of one script."""

    def __init__(self, draw: st.DrawFn, pool: Pool) -> None:
        self.draw = draw
        self.pool = pool
        self.model = Model()

    def text(self, simple: bool = False) -> Text:
        choices = self.pool.texts + (self.pool.simple_only if simple else ())
        return self.draw(st.sampled_from(choices))

    def values(self, count: int) -> tuple[str | None, ...]:
        if self.draw(st.integers(0, 19)) == 19:  # a Bind with the wrong number of values
            count = self.draw(st.integers(0, 3))
        return tuple(self.draw(st.sampled_from(self.pool.values)) for _ in range(count))

    def literals(self, sql: str, count: int) -> str:
        """The text with its parameters written in: what a client that formats its own
        SQL sends as a simple Query."""
        for number in range(count, 0, -1):  # $10 before $1
            value = self.draw(st.sampled_from(self.pool.values))
            literal = "NULL" if value is None else f"'{value}'"
            sql = sql.replace(f"${number}", literal)
        return sql

    def copy_steps(self) -> list[Step]:
        rows = self.draw(st.lists(st.sampled_from(self.pool.copy_rows), min_size=0, max_size=3))
        end: Step = CopyFail() if self.draw(st.integers(0, 5)) == 5 else CopyDone()
        return [*(CopyData(r) for r in rows), end]

    def execute(self, portal: str) -> list[Step]:
        max_rows = self.draw(st.sampled_from((0, 0, 0, 1, 2)))
        steps: list[Step] = [Execute(portal, max_rows)]
        if self.model.may_copy_in(portal):
            steps += self.copy_steps()
        return steps

    def query(self) -> list[Step]:
        text = self.text(simple=True)
        sql = text.sql
        if text.params and self.draw(st.integers(0, 7)) < 7:
            sql = self.literals(sql, text.params)  # else Postgres says "no parameter $1"
        steps: list[Step] = [Query(sql)]
        if text.kind == "copy_in":
            steps += self.copy_steps()
        return steps

    def parse(self, name: str | None = None) -> list[Step]:
        name = name if name is not None else self.draw(st.sampled_from(STATEMENTS))
        text = self.text()
        types: tuple[int, ...] = ()
        if text.params and self.draw(st.booleans()):
            types = (23,) * text.params  # int4, declared
        self.model.parsed(name, text)
        return [Parse(name, text.sql, types)]

    def bind(self, portal: str | None = None, statement: str | None = None) -> list[Step]:
        portal = portal if portal is not None else self.draw(st.sampled_from(PORTALS))
        statement = statement if statement is not None else self.draw(st.sampled_from(STATEMENTS))
        self.model.bound(portal, statement)
        return [Bind(portal, statement, self.values(self.model.params(statement)))]

    def round(self) -> list[Step]:
        """What a driver sends for one statement: Parse, Bind, Describe, Execute, Sync."""
        name = self.draw(st.sampled_from(STATEMENTS))
        portal = self.draw(st.sampled_from(PORTALS))
        steps = self.parse(name) + self.bind(portal, name)
        if self.draw(st.booleans()):
            steps.append(Describe("P", portal))
        steps += self.execute(portal)
        return [*steps, Sync()]

    def action(self) -> list[Step]:
        choice = self.draw(st.integers(0, 13))
        if choice <= 2:
            return self.query()
        if choice <= 4:
            return self.round()
        if choice == 5:
            return self.parse()
        if choice == 6:
            return self.bind()
        if choice == 7:
            return self.execute(self.draw(st.sampled_from((*PORTALS, CURSOR))))
        if choice == 8:
            target = self.draw(st.sampled_from("SP"))
            names = STATEMENTS if target == "S" else (*PORTALS, CURSOR)
            return [Describe(target, self.draw(st.sampled_from(names)))]
        if choice == 9:
            target = self.draw(st.sampled_from("SP"))
            names = STATEMENTS if target == "S" else (*PORTALS, CURSOR)
            return [Close(target, self.draw(st.sampled_from(names)))]
        if choice == 10:
            return [Flush()]
        return [Sync()]

    def batch(self) -> Batch:
        steps: list[Step] = []
        for _ in range(self.draw(st.integers(1, 6))):
            steps += self.action()
        last = steps[-1]
        if not isinstance(last, (Sync, Query, Flush, CopyDone, CopyFail)):
            steps.append(Flush() if self.draw(st.integers(0, 4)) == 4 else Sync())
        elif isinstance(last, (CopyDone, CopyFail)):
            steps.append(Sync())  # an extended COPY ends at its Sync; after a Query, harmless
        return tuple(steps)


@st.composite
def scripts(
    draw: st.DrawFn, pool: Pool = DIFF_POOL, max_batches: int = 4, end_with_sync: bool = True
) -> Script:
    """A script; with ``end_with_sync`` its last round is closed before the client leaves
    (a client leaving in the middle of a failed round meets a known bug, whose own test
    is enough in CI; the long run leaves it open too)."""
    builder = Builder(draw, pool)
    batches: list[Batch] = []
    stolen = False
    for _ in range(draw(st.integers(1, max_batches))):
        if batches and draw(st.integers(0, 5)) == 0:
            batches.append((Give(),) if stolen else (Steal(),))
            stolen = not stolen
        batches.append(builder.batch())
    if end_with_sync and isinstance(batches[-1][-1], Flush):
        batches[-1] = (*batches[-1][:-1], Sync())
    return tuple(batches)


class ShopBuilder(Builder):
    """Scripts of well-formed rounds, for the property of the example policies: what
    reaches the database is what the policy says. The protocol misuse of ``scripts``
    (names that do not exist, Queries inside failed rounds) is the first property's job,
    and meets relay bugs it already counts; here every Bind names a statement parsed
    before, every round ends with its Sync, and a simple Query comes on its own. The
    write paths are all there: several Binds and Executes of one statement in a round,
    Executes with a row limit and again, a Bind in one round and its Execute in a later
    one (inside a transaction), a Parse of the name of a statement whose portal is still
    open, Close then Parse of a named statement, the unnamed one parsed again."""

    def __init__(self, draw: st.DrawFn, pool: Pool) -> None:
        super().__init__(draw, pool)
        self.parsed: list[str] = []  # statement names parsed so far (they may have failed)
        self.bound: list[str] = []  # portal names bound so far

    def unit(self) -> list[Step]:
        choice = self.draw(st.integers(0, 9))
        if choice <= 3 or not self.parsed:
            name = self.draw(st.sampled_from(STATEMENTS))
            steps = []
            if name and name in self.parsed and self.draw(st.integers(0, 4)) < 4:
                steps.append(Close("S", name))  # Close then Parse of a named statement
            self.parsed.append(name)
            return steps + self.parse(name) + self.bound_and_run(name)
        if choice <= 5:
            return self.bound_and_run(self.draw(st.sampled_from(self.parsed)))
        if choice <= 7 and self.bound:
            return self.execute(self.draw(st.sampled_from(self.bound)))
        return self.bound_and_run(self.draw(st.sampled_from(self.parsed)))

    def execute(self, portal: str) -> list[Step]:
        # mostly to the end: the policy refuses a row limit on the Execute of a write
        return [Execute(portal, self.draw(st.sampled_from((0, 0, 0, 0, 1))))]

    def bound_and_run(self, name: str) -> list[Step]:
        # the unnamed portal may be bound again in a round; a named one only once
        portal = "p1" if "p1" not in self.bound and self.draw(st.integers(0, 2)) == 2 else ""
        self.bound.append(portal)
        steps = self.bind(portal, name)
        if self.draw(st.booleans()):
            steps.append(Describe("P", portal))
        for _ in range(self.draw(st.integers(0, 2))):
            steps += self.execute(portal)
        return steps

    def batch(self) -> Batch:
        if self.draw(st.integers(0, 3)) == 3:
            return tuple(self.query())
        self.bound = []  # portals end with their round (outside a transaction block)
        steps: list[Step] = []
        for _ in range(self.draw(st.integers(1, 3))):
            steps += self.unit()
        return (*steps, Sync())


@st.composite
def shop_scripts(draw: st.DrawFn, pool: Pool = SHOP_POOL, max_batches: int = 5) -> Script:
    builder = ShopBuilder(draw, pool)
    batches = [builder.batch() for _ in range(draw(st.integers(1, max_batches)))]
    if draw(st.booleans()):
        batches.append((Query("COMMIT"),))  # what a transaction left open did stays
    return tuple(batches)
