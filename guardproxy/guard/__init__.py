"""Write safety that needs the database: audit log, idempotency ledger, task budgets, row caps."""
