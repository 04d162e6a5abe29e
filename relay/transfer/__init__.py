"""Transfers: one way to fetch a URL into a verified, resumable file.

Download jobs (`relay.downloads`) and `relay fetch` (`relay.fetch`) both use it; each keeps only
what is its own (the job store and API; the command line, its record file and progress bar).

    engine.py    Transfer: attempts, resuming (relay.http.continuation), retries, size checks
    partial.py   PartialFile: exclusive create, lock, hash while writing, verified publish
    errors.py    the error tree each program translates into its own outcomes

The engine sits below the programs and above `relay.http` and `relay.disk` only: it cannot
reach routes, credentials or the egress policy. The program gives it an `Opener` that sends
each request, so where requests go and what they carry stays the program's decision.
"""

from __future__ import annotations

from relay.transfer.engine import Events, Opener, Policy, Representation, Transfer, describe
from relay.transfer.partial import WRITE_BLOCK, PartialFile, Sink, verify

__all__ = [
    "WRITE_BLOCK",
    "Events",
    "Opener",
    "PartialFile",
    "Policy",
    "Representation",
    "Sink",
    "Transfer",
    "describe",
    "verify",
]
