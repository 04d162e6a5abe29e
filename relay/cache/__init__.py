"""The read-through cache: one upstream fetch per object, streamed to every client from disk.

Modules, one concept each: `key` (what identifies a stored response), `policy` (RFC 9111 rules,
sans-IO), `disk` (durable writes), `store` (objects on disk), `index` (LRU and the disk
budget), `fill` (the one upstream fetch of an object), `serve` (the response streamed from the
file as the fill advances), `cache` (the cache itself: lookups, fills, lifespan).
"""
