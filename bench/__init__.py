"""Side-by-side benchmark of direct Postgres, PgBouncer and guardproxy (see bench/README.md)."""
