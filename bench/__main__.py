"""``python -m bench``: run the relay benchmark suite (see bench/README.md)."""

from __future__ import annotations

import sys

from bench import cache
from bench.run import main

if __name__ == "__main__":
    # `python -m bench --cache [options]` is `python -m bench.cache [options]`.
    if "--cache" in sys.argv[1:]:
        raise SystemExit(cache.main([a for a in sys.argv[1:] if a != "--cache"]))
    raise SystemExit(main())
