"""The egress policy: which addresses relay may connect to, in every spelling."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from relay.config import Route
from relay.errors import ConfigError
from relay.net.addresses import EgressRefused, check_addresses, refusal
from relay.net.egress import GuardedResolver
from tests.origin import Origin

REFUSED = [
    "127.0.0.1",
    "127.255.0.9",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "100.64.0.1",
    "100.100.100.200",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::7f00:1",
    "64:ff9b:1::1",
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "ff02::1",
    "2001:db8::1",
]

ALLOWED = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_one_bad_address_refuses_the_name() -> None:
    """A name with any non-public address is refused, whichever address would be tried."""
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.1"):
        check_addresses("mixed.example", ["93.184.216.34", "10.0.0.1"])


@pytest.mark.parametrize(
    "upstream",
    [
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://0177.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/",
        "http://100.100.100.200/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://10.0.0.1:8080/",
    ],
)
def test_private_literal_upstreams_are_refused_at_startup(upstream: str) -> None:
    with pytest.raises(ConfigError, match="allow_private"):
        Route(prefix="/x/", upstream=upstream)
    assert Route(prefix="/x/", upstream=upstream, allow_private=True).allow_private


class ScriptedResolver(AbstractResolver):
    """Answers each lookup with the next scripted address (a DNS rebinding attacker)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers
        self.calls = 0

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        address = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


async def test_rebinding_answer_is_refused_on_the_next_lookup() -> None:
    resolver = GuardedResolver(ScriptedResolver(["93.184.216.34", "127.0.0.1"]))
    assert (await resolver.resolve("rebind.example", 80))[0]["host"] == "93.184.216.34"
    with pytest.raises(EgressRefused, match=r"127\.0\.0\.1"):
        await resolver.resolve("rebind.example", 80)


@pytest.mark.e2e
async def test_connection_goes_to_the_checked_address_with_the_original_host(
    origin: Origin,
) -> None:
    """aiohttp connects to what the guarded resolver checked; Host keeps the name."""
    checked: list[list[str]] = []

    def record(host: str, addresses: Any) -> None:
        checked.append(list(addresses))

    resolver = GuardedResolver(ScriptedResolver(["127.0.0.1"]), check=record)
    connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://pinned.example:{origin.port}/gen/10?pin=1") as response,
    ):
        assert response.status == 200
        assert len(await response.read()) == 10
    assert checked == [["127.0.0.1"]]
    seen = [r for r in origin.requests if r.target == "/gen/10?pin=1"][-1]
    assert seen.header("host") == f"pinned.example:{origin.port}"
