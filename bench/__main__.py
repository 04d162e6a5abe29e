"""``python -m bench``: run the relay benchmark suite (see bench/README.md)."""

from __future__ import annotations

import sys

from bench import cache, oci
from bench.run import main

if __name__ == "__main__":
    # `python -m bench --cache [options]` is `python -m bench.cache [options]`.
    if "--cache" in sys.argv[1:]:
        raise SystemExit(cache.main([a for a in sys.argv[1:] if a != "--cache"]))
    # `python -m bench --oci [options]` is `python -m bench.oci [options]`.
    if "--oci" in sys.argv[1:]:
        raise SystemExit(oci.main([a for a in sys.argv[1:] if a != "--oci"]))
    raise SystemExit(main())
