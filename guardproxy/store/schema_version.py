"""The alembic revision of guardproxy's schema this version needs.

The proxy checks it at start with one query, without importing alembic and
SQLAlchemy into every worker (they would cost each one about 30 MB of memory).
`tests/unit/test_schema_version.py` fails when a migration is added and this is not
updated.
"""

SCHEMA_HEAD = "0007"
