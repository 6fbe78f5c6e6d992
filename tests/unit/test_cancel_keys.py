"""The cancel key layout (instance slot, worker, random bits in the pid) and the settings
that say where other instances reach this one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.config import Settings, join_address, load_settings, parse_address
from guardproxy.protocol import codec
from guardproxy.protocol.errors import ConfigError, ProtocolViolation
from guardproxy.server.cancel import (
    MAX_SLOT,
    MAX_WORKERS,
    RANDOM_BITS,
    new_cancel_key,
    slot_of,
    worker_of,
)
from guardproxy.server.instances import (
    SlotCell,
    _literal,
    advertised_address,
    claim_sql,
    is_loopback_address,
)

INT32_MAX = 2**31 - 1


@given(st.integers(0, MAX_SLOT), st.integers(0, MAX_WORKERS - 1))
def test_slot_and_worker_round_trip_and_the_pid_is_a_positive_int32(slot: int, worker: int) -> None:
    pid, secret = new_cancel_key(slot, worker)
    assert (slot_of(pid), worker_of(pid)) == (slot, worker)
    assert 0 < pid <= INT32_MAX
    assert 0 <= secret <= INT32_MAX
    struct.pack("!ii", pid, secret)  # what BackendKeyData and CancelRequest carry


def test_extremes_of_the_layout() -> None:
    pid, _ = new_cancel_key(MAX_SLOT, MAX_WORKERS - 1)
    assert pid >> RANDOM_BITS == (MAX_SLOT << 6) | (MAX_WORKERS - 1)
    assert 0 < pid <= INT32_MAX
    for _ in range(2000):  # no slot, worker 0: the random part alone, and it is never 0
        pid, _ = new_cancel_key(0, 0)
        assert 0 < pid < 2**RANDOM_BITS


def test_keys_are_random_in_pid_and_secret() -> None:
    keys = {new_cancel_key(3, 1) for _ in range(500)}
    assert len(keys) == 500
    assert len({pid for pid, _ in keys}) > 450
    assert {slot_of(pid) for pid, _ in keys} == {3}
    assert max(secret for _, secret in keys) > 2**30  # the secret keeps its 31 random bits


@pytest.mark.parametrize(("slot", "worker"), [(-1, 0), (MAX_SLOT + 1, 0), (1, -1), (1, 64)])
def test_out_of_range_slot_or_worker_is_refused(slot: int, worker: int) -> None:
    with pytest.raises(ValueError):
        new_cancel_key(slot, worker)


def test_workers_setting_fits_the_worker_bits() -> None:
    assert Settings.model_fields["workers"].metadata[-1].le <= MAX_WORKERS


@given(st.integers(-(2**31), 2**31 - 1))
def test_any_pid_a_client_sends_gives_a_slot_and_a_worker_in_range(pid: int) -> None:
    assert 0 <= slot_of(pid) <= MAX_SLOT
    assert 0 <= worker_of(pid) < MAX_WORKERS


def test_relayed_cancel_has_the_cancel_shape_and_its_own_code() -> None:
    packet = codec.build_cancel(1234, 5678, codec.RELAYED_CANCEL_REQUEST)
    assert len(packet) == 16
    assert codec.RELAYED_CANCEL_REQUEST not in (
        codec.CANCEL_REQUEST,
        codec.SSL_REQUEST,
        codec.GSSENC_REQUEST,
    )
    startup = codec.parse_startup(packet[4:])
    assert (startup.code, startup.cancel_pid, startup.cancel_secret) == (
        codec.RELAYED_CANCEL_REQUEST,
        1234,
        5678,
    )
    with pytest.raises(ProtocolViolation, match="relayed CancelRequest must be 16 bytes"):
        codec.parse_startup(packet[4:] + b"\x00")


# ---------------------------------------------------------------- addresses and settings


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.3.7:6432", "10.0.3.7", 6432),
        ("guardproxy-0.guardproxy.svc:6432", "guardproxy-0.guardproxy.svc", 6432),
        ("[fd00::7]:6432", "fd00::7", 6432),
        ("fd00::7:6432", "fd00::7", 6432),  # $(POD_IP):6432 with an IPv6 pod IP
    ],
)
def test_parse_address(text: str, host: str, port: int) -> None:
    assert parse_address(text) == (host, port)
    assert parse_address(join_address(host, port)) == (host, port)


@pytest.mark.parametrize(
    "text", ["10.0.3.7", "10.0.3.7:", ":6432", "10.0.3.7:0", "10.0.3.7:70000", "a'b:1", "a b:1"]
)
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_advertise_address_setting_from_env_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDPROXY_ADVERTISE_ADDRESS", "10.1.2.3:6432")
    assert load_settings().advertise_address == "10.1.2.3:6432"
    monkeypatch.setenv("GUARDPROXY_ADVERTISE_ADDRESS", "10.1.2.3")
    with pytest.raises(ConfigError, match=r"advertise_address.*GUARDPROXY_ADVERTISE_ADDRESS"):
        load_settings()


def test_heartbeat_must_fit_twice_into_the_stale_time() -> None:
    with pytest.raises(ConfigError, match="instance_stale_after"):
        load_settings(overrides={"instance_heartbeat_interval": 10, "instance_stale_after": 15})
    s = load_settings(overrides={"instance_heartbeat_interval": 0.5, "instance_stale_after": 1})
    assert (s.instance_heartbeat_interval, s.instance_stale_after) == (0.5, 1)
    assert (Settings().instance_heartbeat_interval, Settings().instance_stale_after) == (10, 60)


def test_default_advertise_address() -> None:
    assert advertised_address(Settings(listen_port=0), 41234) == "127.0.0.1:41234"
    assert advertised_address(Settings(listen_host="::1"), 6432) == "[::1]:6432"
    given = Settings(advertise_address="proxy-a.internal:7000")
    assert advertised_address(given, 6432) == "proxy-a.internal:7000"
    # a wildcard listener advertises what the machine's name resolves to
    wildcard = Settings(listen_host="0.0.0.0", auth_mode="scram", auth_file=Path("agents.auth"))
    host, port = parse_address(advertised_address(wildcard, 6432))
    assert port == 6432 and host not in ("0.0.0.0", "")
    assert is_loopback_address("127.0.0.1:1") and is_loopback_address("[::1]:1")
    assert not is_loopback_address("10.0.0.1:6432")


def test_registry_values_are_quoted_only_when_safe() -> None:
    assert _literal("10.0.0.1:6432") == "'10.0.0.1:6432'"
    assert _literal("[fd00::1]:6432") == "'[fd00::1]:6432'"
    for bad in ("a'b", "a\\b", "a;b", "a\x00b"):
        with pytest.raises(ValueError):
            _literal(bad)
    sql = claim_sql("10.0.0.1:6432", "host/1/ab", 60, prefer=3)
    assert "ON CONFLICT (slot) DO UPDATE" in sql and "s.slot = 3 DESC" in sql


def test_slot_cell_local_and_shared() -> None:
    for cell in (SlotCell(), SlotCell(shared=True)):
        assert cell.get() == SlotCell.PENDING and cell.slot == 0
        cell.set(7)
        assert (cell.get(), cell.slot) == (7, 7)
