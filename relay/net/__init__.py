"""Reaching upstreams: routes to URLs, the shared client, transports, egress policy."""
