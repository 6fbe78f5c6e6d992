-- Statements a helpdesk agent sent before guardproxy was in front of it, for
-- `guardproxy replay` (docs/quickstart-own-schema.md).
SET guard.principals = '1';
SELECT id, subject, status FROM tickets WHERE status = 'open';
SELECT display_name, email FROM users WHERE id = 1;
UPDATE tickets SET status = 'pending' WHERE id = 1;
DELETE FROM tickets WHERE id = 3;
INSERT INTO comments (ticket_id, author_id, body) VALUES (2, 2, 'Restocked');
UPDATE comments SET body = 'Restocked today' WHERE id = 1;
TRUNCATE refunds;
SELECT * FROM pg_stat_activity;
