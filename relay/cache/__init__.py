"""The read-through cache: one upstream fetch per object, streamed to every client from disk.

Modules, one concept each:

- `clock`: the injected time (`Clock`, `SYSTEM_CLOCK`, `ManualClock` for tests);
- `key`: what identifies a stored response;
- `policy`: RFC 9111 rules, sans-IO (storable, lifetime, age, freshness, `answer`);
- `plan`: the decision for one request, sans-IO (hit / stale / revalidate / miss / slices /
  pass);
- `store`: the on-disk layout, stored versions and the record's schema (`Meta`, paths,
  publish, load, remove, disk use);
- `index`: the in-memory LRU, the disk budget, the versions readers hold;
- `fill`: the one upstream fetch of an object into its partial file;
- `cache`: the registry (lookups, one fill per key, budget, eviction, purge, lifespan);
- `slices`: sliced objects (slice fills, revalidations, hints, the digest check);
- `slice_answer`: answering a Range or a whole GET from slices;
- `integrity`: stored bytes against their known digest (unverified objects after a restart,
  coalesced checks, the background verification and the scrub);
- `executor`: the cache's own threads, and the order of the jobs on one object's files;
- `delivery`: response heads and body pumps;
- `serve`: `CachedResponse`, the response of a cached route;
- `admission`: which requests the cache takes, and the fill's upstream request;
- `hub`, `rewritten`, `admin`: the Hub's content-addressed files, rewritten index pages, the
  admin endpoints.
"""
