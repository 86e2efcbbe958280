"""Trainer <-> worker protocol: messages (schema), framing (bytes), transport (ZeroMQ)."""
