-- A statement log for `guardproxy replay` (docs/policies.md, replay): what an
-- analytics agent sent before guardproxy was in front of it.
SELECT count(*) FROM orders WHERE fulfillment_status = 'shipped';
SELECT name, email FROM customers WHERE id = 1;
SELECT id, name FROM customers ORDER BY created_at DESC;
SELECT amount FROM payments WHERE order_id = 1;
SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id;
