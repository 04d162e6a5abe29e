"""Stream slots shared by workers: the mapped table against a model of what one limiter does."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import Overloaded, TooManyStreams
from relay.proxy.shared_admission import SLOTS_FILE, SharedStreamLimiter, SlotTable, _client_key


def limiters(
    tmp_path: Path, workers: int, limit: int, per_client: int
) -> list[SharedStreamLimiter]:
    SlotTable.create(tmp_path, workers=workers, max_streams=limit, per_client=per_client > 0)
    return [
        SharedStreamLimiter(
            tmp_path / SLOTS_FILE, worker=i, workers=workers, limit=limit, per_client=per_client
        )
        for i in range(workers)
    ]


def test_the_limit_is_the_servers_whichever_worker_asks(tmp_path: Path) -> None:
    a, b = limiters(tmp_path, 2, limit=4, per_client=0)
    assert [a.acquire(), b.acquire(), a.acquire(), b.acquire()] == [None] * 4
    assert isinstance(a.acquire(), Overloaded)
    assert isinstance(b.acquire(), Overloaded)
    b.release()
    assert a.acquire() is None
    assert (a.active, b.active, a.server_active()) == (3, 1, 4)


def test_a_clients_streams_count_in_every_worker(tmp_path: Path) -> None:
    a, b = limiters(tmp_path, 2, limit=100, per_client=2)
    assert a.acquire("10.0.0.1") is None
    assert b.acquire("10.0.0.1") is None
    assert isinstance(a.acquire("10.0.0.1"), TooManyStreams)
    assert isinstance(b.acquire("10.0.0.1"), TooManyStreams)
    assert b.acquire("10.0.0.2") is None
    a.release("10.0.0.1")
    assert b.acquire("10.0.0.1") is None
    assert (a.by_client, b.by_client) == ({}, {"10.0.0.1": 2, "10.0.0.2": 1})


def test_a_dead_workers_slots_come_back(tmp_path: Path) -> None:
    """The supervisor clears a dead worker's column: its slots and its clients' counts."""
    a, b = limiters(tmp_path, 2, limit=2, per_client=1)
    assert a.acquire("10.0.0.1") is None
    assert a.acquire("10.0.0.2") is None
    assert isinstance(b.acquire("10.0.0.3"), Overloaded)
    SlotTable(tmp_path / SLOTS_FILE, workers=2, max_streams=2, per_client=True).clear_worker(0)
    assert b.acquire("10.0.0.1") is None
    assert isinstance(b.acquire("10.0.0.1"), TooManyStreams)
    assert b.server_active() == 1


def test_a_restarted_worker_starts_with_no_slots(tmp_path: Path) -> None:
    a, b = limiters(tmp_path, 2, limit=3, per_client=0)
    assert a.acquire() is None
    assert a.acquire() is None
    again = SharedStreamLimiter(tmp_path / SLOTS_FILE, worker=0, workers=2, limit=3)
    assert (again.server_active(), b.server_active()) == (0, 0)


Op = tuple[str, int, int]  # (acquire | release | clear, worker, client)
# Clients 0-40 in a 64-row table: several share a home row (1, 14, 19 and 20 do), so inserts
# and deletions run through probe runs.


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["acquire", "acquire", "release", "clear"]),
            st.integers(0, 2),
            st.integers(0, 40),
        ),
        max_size=300,
    )
)
def test_the_table_agrees_with_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Op]
) -> None:
    """Every decision and count matches a plain model, through inserts, the backward-shift
    deletions and a dead worker's rebuild (many clients in a small table: long probe runs)."""
    path = tmp_path_factory.mktemp("slots")
    limit, per_client = 24, 3
    workers = limiters(path, 3, limit=limit, per_client=per_client)
    table = SlotTable(path / SLOTS_FILE, workers=3, max_streams=limit, per_client=True)
    held: dict[tuple[int, int], int] = {}
    for op, worker, client in ops:
        address = f"10.0.{client}.1"
        if op == "acquire":
            total = sum(held.values())
            mine = sum(n for (_, c), n in held.items() if c == client)
            refusal = workers[worker].acquire(address)
            if total >= limit:
                assert isinstance(refusal, Overloaded)
            elif mine >= per_client:
                assert isinstance(refusal, TooManyStreams)
            else:
                assert refusal is None
                held[worker, client] = held.get((worker, client), 0) + 1
        elif op == "release" and held:
            # One of the slots held, picked by the drawn numbers.
            worker, client = sorted(held)[(worker * 41 + client) % len(held)]
            workers[worker].release(f"10.0.{client}.1")
            held[worker, client] -= 1
            if not held[worker, client]:
                del held[worker, client]
        elif op == "clear":
            table.clear_worker(worker)
            held = {k: n for k, n in held.items() if k[0] != worker}
            workers[worker].active = 0
            workers[worker].by_client = {}
        with table.locked() as words:
            assert table.total(words) == sum(held.values())
            for c in range(41):
                row = table.find(words, _client_key(f"10.0.{c}.1"))
                expected = sum(n for (_, cc), n in held.items() if cc == c)
                assert table.held(words, row) == expected
            used = sum(1 for r in range(table.rows) if words[table._row_base(r)] != 0)
            assert used == len({c for (_, c) in held})
    for limiter in workers:
        limiter.close()
    table.close()
