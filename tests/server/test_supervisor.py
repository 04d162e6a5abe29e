"""The pieces of `workers = N` that need no process: settings, the pool split, readiness, the
merge of every worker's scrape-time metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import Config, WorkerInfo
from relay.errors import ConfigError
from relay.net.peers import is_peer_request
from relay.server.health import Readiness
from relay.server.metrics_merge import merge
from relay.server.supervisor import STATE_FILE, ServerState, server_readiness, worker_config


def test_workers_default_to_one_process() -> None:
    assert Config().workers == 1
    assert Config.load(environ={"RELAY_WORKERS": "4"}).workers == 4
    assert Config.load(cli={"workers": "2"}).workers == 2


def test_workers_need_a_connection_each() -> None:
    with pytest.raises(ConfigError, match="max_connections >= 8"):
        Config(workers=8, max_connections=4)
    with pytest.raises(ConfigError, match="at least 1"):
        Config(workers=0)


def test_the_upstream_pool_is_split_evenly_and_never_exceeded() -> None:
    config = Config(workers=3, max_connections=100)
    shares = [worker_config(config, i).max_connections for i in range(3)]
    assert shares == [34, 33, 33]
    assert sum(shares) == 100


def test_a_worker_info_is_checked() -> None:
    with pytest.raises(ValueError, match="run_dir"):
        WorkerInfo(index=0, count=2)
    with pytest.raises(ValueError, match="below the count"):
        WorkerInfo(index=2, count=2, run_dir=Path("/run"))
    info = WorkerInfo(index=1, count=3, run_dir=Path("/run/r"))
    assert info.peers() == [0, 2]
    assert info.peer_socket(2) == Path("/run/r/worker-2.sock")


def test_readiness_speaks_for_the_whole_server(tmp_path: Path) -> None:
    state = ServerState(tmp_path / STATE_FILE)
    readiness = Readiness()
    readiness.started = True
    readiness.server = server_readiness(WorkerInfo(index=0, count=2, run_dir=tmp_path))
    state.up = 1
    assert readiness.not_ready() == "1 of 2 workers up"
    state.up = 2
    assert readiness.ready
    state.draining = True
    assert readiness.not_ready() == "draining"


def test_peer_requests_are_those_on_a_unix_socket() -> None:
    assert is_peer_request({"server": ("/tmp/relay-run-x/worker-1.sock", None)})
    assert not is_peer_request({"server": ("127.0.0.1", 8000)})
    assert not is_peer_request({})


def _family(name: str, kind: str, *samples: tuple[str, dict[str, str], float]) -> dict[str, object]:
    return {
        "name": name,
        "documentation": name,
        "type": kind,
        "unit": "",
        "samples": [list(s) for s in samples],
    }


_M = {"route": "/o/", "mirror": "2"}


def test_scrape_time_values_are_summed_except_server_wide_ones() -> None:
    worker = [
        _family("relay_active_streams", "gauge", ("relay_active_streams", {"route": "/o/"}, 3)),
        _family("relay_max_downloads", "gauge", ("relay_max_downloads", {}, 4)),
        _family("relay_cache_hits", "counter", ("relay_cache_hits_total", {}, 10)),
        _family("process_start_time_seconds", "gauge", ("process_start_time_seconds", {}, 50)),
        _family("relay_upstream_mirror_up", "gauge", ("relay_upstream_mirror_up", _M, 1)),
        _family("relay_ready", "gauge", ("relay_ready", {}, 1)),
    ]
    other = [
        _family("relay_active_streams", "gauge", ("relay_active_streams", {"route": "/o/"}, 2)),
        _family("relay_max_downloads", "gauge", ("relay_max_downloads", {}, 4)),
        _family("relay_cache_hits", "counter", ("relay_cache_hits_total", {}, 5)),
        _family("process_start_time_seconds", "gauge", ("process_start_time_seconds", {}, 40)),
        _family("relay_upstream_mirror_up", "gauge", ("relay_upstream_mirror_up", _M, 0)),
        _family("relay_ready", "gauge", ("relay_ready", {}, 0)),
    ]
    merged = {
        m.name: [(s.name, s.labels, s.value) for s in m.samples] for m in merge([worker, other])
    }
    assert merged == {
        "relay_active_streams": [("relay_active_streams", {"route": "/o/"}, 5)],
        "relay_max_downloads": [("relay_max_downloads", {}, 4)],
        "relay_cache_hits": [("relay_cache_hits_total", {}, 15)],
        "process_start_time_seconds": [("process_start_time_seconds", {}, 40)],
        # each worker keeps its own passive health: up only while no worker rests the mirror
        "relay_upstream_mirror_up": [("relay_upstream_mirror_up", _M, 0)],
        # ready only while every worker is
        "relay_ready": [("relay_ready", {}, 0)],
    }
