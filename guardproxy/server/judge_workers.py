"""Judging large statements off the event loop, in worker processes, within a time budget.

Parsing and judging a statement costs time in proportion to its size (a megabyte of
SQL takes more than a second to turn into a parse tree). On the event loop that
serves every agent, one agent could stall all the others with large statements. So
a statement larger than ``judge_offload_above`` is analyzed in one of
``judge_workers`` processes (the same policies, loaded from the same directory, and
the proxy's catalog), while the loop goes on serving everyone else; its session
waits. A statement whose analysis takes longer than ``judge_timeout`` is refused
(fail closed) and its worker is replaced.

When every worker is busy, the statement that looks cheapest to analyze goes next
(its length, and its parentheses weighted as the nesting they may open): an agent
sending slow statements waits behind its own, not the agent with an ordinary one.

Workers start on first use and are started again after a policy reload. They
exchange plain Python values with the proxy (``relay.judging.Analysis.portable``:
compiled classes do not pickle).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from guardproxy.analysis.catalog import Catalog
from guardproxy.policy import SessionContext
from guardproxy.protocol.errors import Denied
from guardproxy.relay.judging import Analysis, analyze

log = logging.getLogger("guardproxy.judge")

STARTUP = 15.0  # seconds a new worker may take to start, on top of its first statement's budget
NESTING_WEIGHT = 200  # bytes of text one parenthesis costs, in the order of the queue


def analysis_cost(sql: str) -> int:
    """What analyzing ``sql`` looks like it costs: the queue serves the cheapest first."""
    return len(sql) + NESTING_WEIGHT * sql.count("(")


def _catalog_parts(catalog: Catalog) -> dict[str, Any]:
    return {
        "tables": dict(catalog.tables),
        "search_path": catalog.search_path,
        "version": catalog.version,
        "primary_keys": dict(catalog.primary_keys),
        "foreign_keys": dict(catalog.foreign_keys),
    }


def _serve(conn: Connection, policies_dir: str) -> None:  # pragma: no cover - in the worker
    """A worker's loop: (policy name, SQL, context, catalog or None) in, analysis out."""
    from guardproxy.policy import Judge, load_policy_set

    policies = load_policy_set(Path(policies_dir))
    judge = Judge(policies)
    while True:
        try:
            name, sql, context, catalog = conn.recv()
        except EOFError:
            return
        if catalog is not None:
            judge.set_catalog(Catalog(**catalog))
        policy = policies.get(name)
        if policy is None:
            conn.send(None)
            continue
        conn.send(analyze(judge, policy, sql, context).portable())


class _Worker:
    def __init__(self, policies_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_serve, args=(child, str(policies_dir)), daemon=True, name="guardproxy-judge"
        )
        self.process.start()
        child.close()
        self.catalog: Catalog | None = None  # the catalog it was given last
        self.generation = 0  # of the policies it loaded
        self.fresh = True  # has not answered yet (is maybe still starting)

    def call(self, request: tuple[Any, ...], timeout: float) -> Any:
        """In a thread: the request, and its answer within ``timeout`` (TimeoutError)."""
        self.conn.send(request)
        if not self.conn.poll(timeout):
            raise TimeoutError
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
        if self.process.is_alive():
            self.process.terminate()


class JudgeWorkers:
    def __init__(self, policies_dir: Path, size: int, timeout: float) -> None:
        self.policies_dir = policies_dir
        self.size = size
        self.timeout = timeout
        self._idle: list[_Worker] = []
        self._count = 0  # workers alive (idle or busy)
        self._generation = 0  # bumped by a policy reload
        self._slots = size  # workers not busy
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap, cheapest first
        self._order = itertools.count()
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=size, thread_name_prefix="guardproxy-judge"
        )

    async def analyze(
        self, policy_name: str, sql: str, context: SessionContext, catalog: Catalog
    ) -> Analysis:
        """The analysis of ``sql`` (a Denied of rule ``limits.analysis`` past the budget)."""
        await self._take_slot(analysis_cost(sql))
        try:
            answer = await self._run(policy_name, sql, context, catalog)
        finally:
            self._give_slot()
        if answer is None:
            raise RuntimeError(f"the judge workers do not know agent type {policy_name!r}")
        if isinstance(answer, Analysis):  # a refusal made here
            return answer
        return Analysis.restored(answer)

    async def _take_slot(self, cost: int) -> None:
        if self._slots > 0 and not self._waiting:
            self._slots -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (cost, next(self._order), turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give_slot()  # it was handed the slot as it was cancelled
            else:
                self._waiting = [w for w in self._waiting if w[2] is not turn]
                heapq.heapify(self._waiting)
            raise

    def _give_slot(self) -> None:
        while self._waiting:
            _, _, turn = heapq.heappop(self._waiting)
            if not turn.done():
                turn.set_result(None)  # the slot passes to it
                return
        self._slots += 1

    async def _run(
        self, policy_name: str, sql: str, context: SessionContext, catalog: Catalog
    ) -> Any:
        """One analysis on a worker of this process's own (its slot taken)."""
        worker = self._idle.pop() if self._idle else self._start()
        given = None if worker.catalog is catalog else _catalog_parts(catalog)
        loop = asyncio.get_running_loop()
        try:
            # a worker's first call also waits for it to start (imports, policies),
            # and a new catalog to be read: not the statement's to pay for
            grace = (STARTUP if worker.fresh else 0.0) + (1.0 if given is not None else 0.0)
            answer = await loop.run_in_executor(
                self._threads,
                worker.call,
                (policy_name, sql, context, given),
                self.timeout + grace,
            )
        except (TimeoutError, OSError, EOFError) as exc:
            worker.stop()
            self._count -= 1
            if isinstance(exc, TimeoutError):
                return Analysis.refused(
                    Denied(
                        f"the statement took longer than {self.timeout:g}s to analyze "
                        f"({len(sql)} characters), the most guardproxy spends on one "
                        "statement (judge_timeout); it was not run",
                        rule="limits.analysis",
                        hint="send a shorter, simpler statement; split large batches",
                        sqlstate="54000",
                    )
                )
            raise
        worker.catalog = catalog
        worker.fresh = False
        if worker.generation == self._generation:
            self._idle.append(worker)
        else:  # the policies were reloaded while it worked
            worker.stop()
            self._count -= 1
        return answer

    def _start(self) -> _Worker:
        self._count += 1
        worker = _Worker(self.policies_dir)
        worker.generation = self._generation
        return worker

    def restart(self) -> None:
        """After a policy reload: idle workers go; the next statement starts fresh ones."""
        self._generation += 1
        for worker in self._idle:
            worker.stop()
        self._count -= len(self._idle)
        self._idle.clear()

    def close(self) -> None:
        self.restart()
        self._threads.shutdown(wait=False, cancel_futures=True)
