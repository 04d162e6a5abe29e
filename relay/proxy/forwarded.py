"""X-Forwarded-* : believed only from configured proxies, always set for the upstream."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import NamedTuple

from relay.net.addresses import parse_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Forwarded(NamedTuple):
    for_chain: str
    """The X-Forwarded-For value to send upstream (the chain, ending with relay's peer)."""
    proto: str
    host: str | None
    client: str | None
    """The original client: the nearest address in the chain that is not a trusted proxy."""


class ForwardedPolicy:
    def __init__(self, trusted: Iterable[Network]) -> None:
        self._trusted = tuple(trusted)

    def is_trusted(self, address: str | None) -> bool:
        if not self._trusted:
            return False  # the default: no address to parse, per request
        ip = parse_ip(address) if address else None
        if ip is None:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self._trusted)

    def resolve(
        self, peer: str | None, scheme: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> Forwarded:
        host = chain = proto = fwd_host = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"host":
                host = value.decode("latin-1")
            elif lname == b"x-forwarded-for":
                text = value.decode("latin-1")
                chain = f"{chain}, {text}" if chain else text
            elif lname == b"x-forwarded-proto":
                proto = value.decode("latin-1").split(",")[0].strip().lower()
            elif lname == b"x-forwarded-host":
                fwd_host = value.decode("latin-1").split(",")[0].strip()
        if peer is None or not self.is_trusted(peer):
            # Anything the client claims about earlier hops is discarded.
            return Forwarded(peer or "", scheme, host, peer)
        hops = [h.strip() for h in (chain or "").split(",") if h.strip()]
        client = peer
        for hop in reversed(hops):
            client = hop
            if not self.is_trusted(hop):
                break
        return Forwarded(
            ", ".join([*hops, peer]),
            proto if proto in ("http", "https") else scheme,
            fwd_host or host,
            client,
        )
