"""From a database of one's own to a checked policy: the tools a new user runs first.

* `schema`: the database's tables, columns (with types, defaults, sequences),
  primary keys and functions as plain data, read from a schema script
  (``CREATE TABLE`` ..., ``ALTER TABLE ... ADD COLUMN``, ``pg_dump -s`` output);
  `introspect` reads the same from a live database.
* `personal`: which column names look like personal data.
* `skeleton`: ``guardproxy init``, a commented policy skeleton for a schema.
* `dbcheck`: ``guardproxy check --upstream``, policies against the real catalog,
  row filters planned by Postgres, each problem with its file and line.
* `replay`: ``guardproxy replay``, past statements through the judge only.
* `privileges`: what the proxy's own login needs (grants for ``guardproxy roles``,
  the check ``serve`` runs before it listens).

Pure where it can be: only `introspect`, the planning half of `dbcheck`, the
``pg_stat_statements`` source of `replay` and `privileges.check_login` talk to
a database.
"""
