"""What a client session, its login and the admin console use of the proxy process.

``server/app.py``'s ``Proxy`` is the one implementation. These protocols keep the
dependency one way: the proxy knows its sessions, a session knows only this
surface of the proxy (no import cycle between ``app`` and the modules it runs).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from guardproxy.config import Settings, Upstream
    from guardproxy.delegation.verify import Verifier as TokenVerifier
    from guardproxy.metrics import StatsRegistry
    from guardproxy.policy import Judge, PolicySet
    from guardproxy.pool.backend import Backend
    from guardproxy.pool.pool import Pool
    from guardproxy.protocol.scram import Verifier
    from guardproxy.relay.autoprepare import AutoPrepare
    from guardproxy.server.judge_workers import JudgeWorkers
    from guardproxy.server.login_limits import LoginLimits
    from guardproxy.server.tls import ServerTLS
    from guardproxy.store.audit_writer import AuditLog

CancelOrigin = Literal["client", "peer", "worker"]


class SessionView(Protocol):
    """A client session as the proxy and the admin console see it."""

    agent_id: str
    agent_type: str
    peer: str
    admin: bool
    cancel_key: tuple[int, int]

    @property
    def server(self) -> Backend | None: ...
    @property
    def blocked(self) -> bool: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def task(self) -> str | None: ...
    @property
    def transactions(self) -> int: ...
    @property
    def queries(self) -> int: ...
    def kill(self, reason: str) -> None: ...


class ProxyServices(Protocol):
    settings: Settings
    upstream: Upstream
    policies: PolicySet | None
    judge: Judge | None
    audit: AuditLog | None
    tls: ServerTLS | None
    stats: StatsRegistry
    verifiers: dict[str, Verifier]
    login_limits: LoginLimits
    pools: dict[str, Pool]
    verifier: TokenVerifier | None  # of delegation tokens
    judge_workers: JudgeWorkers | None
    auto_prepare: AutoPrepare | None

    @property
    def pool(self) -> Pool: ...
    @property
    def sessions(self) -> Mapping[tuple[int, int], SessionView]: ...
    def pool_for(self, agent_type: str) -> Pool: ...
    def new_cancel_key(self) -> tuple[int, int]: ...
    # a ClientSession (Any: the proxy keeps its own sessions' type)
    def register(self, session: Any) -> None: ...
    def forget(self, session: Any) -> None: ...
    def agent_label(self, agent_id: str) -> str: ...
    def catalog_changed(self) -> None: ...
    def client_pid_of_backend(self, backend_pid: int) -> int: ...
    def cancel(self, pid: int, secret: int, origin: CancelOrigin = "client") -> None: ...
    def check_auth_rate(self, source: str, agent_id: str) -> None: ...
    def auth_failed(self, source: str, agent_id: str) -> None: ...
    def at_client_limit(self) -> bool: ...
    def login_done(self, session: Any) -> None: ...
    def sessions_of_type(self, agent_type: str) -> int: ...
    def admin_query(self, sql: str, by: str = "") -> Awaitable[bytes]: ...
    def reload(self) -> str: ...
    def pause(self) -> Awaitable[None]: ...
    def resume(self) -> None: ...
    def kill_agent(self, agent_id: str) -> int: ...
