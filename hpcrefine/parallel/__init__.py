"""The parallel layer: rank roles, work decomposition and reductions. Communicators are passed in."""
