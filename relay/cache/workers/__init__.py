"""One cache across worker processes (`workers > 1`): what the workers sharing one `cache_dir`
coordinate through the file system, one concept per module:

- `lead`: which worker fills a key, by an `flock` per key that dies with its holder;
- `follow`: a fill run by another worker, followed by reading its partial file from the
  first byte, its end and its failure learned from its files and its lock;
- `leading`: a worker's misses, led (holding the lock, announcing the head) or followed;
- `ledger`: the shared record (SQLite, WAL) of what is stored, its cost, the reservations and
  the LRU order: one budget and one eviction order for every worker;
- `index`: each worker's in-memory index kept in step with the ledger (`LedgerIndex`);
- `shared`: one worker's part: its files under `cache_dir/workers/`, who cleans up at start;
- `volume`: what the volume must provide, checked at startup.

With one worker none of this runs: the cache works as it always did.
"""
