"""guardproxy: a PostgreSQL wire-protocol proxy that guards what AI agents do to a database."""

from guardproxy import native as _native

__version__ = "0.1.0"

# GUARDPROXY_NATIVE: a checkout's compiled hot path (scripts/compile), checked and put
# before the sources; first, so that no hot-path module is imported from source before it
_native.install_from_env()
