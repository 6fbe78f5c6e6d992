"""guardproxy: a PostgreSQL wire-protocol proxy that guards what AI agents do to a database."""

__version__ = "0.1.0"
