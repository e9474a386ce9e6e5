"""Gateway tests: fake upstreams, a real Redis, gateways served on threads."""
