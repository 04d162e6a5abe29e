"""Benchmarks for relay: throughput, CPU, req/s, TTFB and memory against direct and nginx.

Run from the repository root with ``python -m bench`` (see ``bench/README.md``).
"""

from __future__ import annotations
