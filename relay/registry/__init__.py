"""`preset = "oci"`: relay as a read-only pull-through container registry mirror.

Clients (containerd's hosts.toml mirrors, CRI-O/podman/skopeo registries.conf, docker's
`registry-mirrors`) speak the OCI distribution API to relay under `/v2/`; each oci route is
one upstream registry. The pieces, each in its module:

- `names`: which route and repository a request names (`ns=`, a route name prefix, a route's
  own `<prefix>v2/`, the default route), strict and bounded parsing;
- `errors`: the registry's JSON error form, relay's errors mapped onto its codes;
- `auth`: the upstream token dance done by relay (tokens per route and scope, bounded);
- `upstream`: relay's own requests to a registry, and its non-200 answers mapped;
- `tags`: tag -> digest, a record in the cache (it survives a restart), with a freshness per
  route, revalidated by HEAD;
- `heads`: the exact response heads (digest, type, length);
- `serve`: blobs and manifests by digest through the cache (content-addressed: keyed by the
  digest alone), tags via their records, listings relayed; `relayed`: what the cache does not
  take, relayed with the body checked against its digest;
- `endpoint`: the `/v2/` endpoint (client authentication, routing, `GET /v2/`).

It sits above the cache (it serves through it) and below the server (which mounts it).
"""
