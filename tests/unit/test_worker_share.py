"""Per-type connection limits of the policies, shared by the workers of one instance."""

from guardproxy.server.app import worker_share


def test_a_policys_server_connections_are_split_over_workers_without_passing_the_limit() -> None:
    assert [worker_share(20, 1, 0)] == [20]
    assert [worker_share(20, 2, w) for w in range(2)] == [10, 10]
    assert [worker_share(7, 3, w) for w in range(3)] == [3, 2, 2]
    assert sum(worker_share(4, 4, w) for w in range(4)) == 4
    assert [worker_share(2, 4, w) for w in range(4)] == [1, 1, 1, 1]  # never none
