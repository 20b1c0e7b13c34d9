"""kmsd: a key-management sidecar daemon (envelope encryption, JWTs, an
isolated vault process)."""

__version__ = "0.1.0"
