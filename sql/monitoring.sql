-- guardproxy: what agents are doing, seen from Postgres itself.
--
-- Every statement guardproxy forwards starts with a sqlcommenter comment such as
--   /*agent='support-1',agent_type='support',step='2',task='refund-42'*/
-- and the server connection's application_name is the agent id (then the
-- client's own name after a slash). These views read both. They read only the
-- comment at the very start of the text: that one is the proxy's, since nothing
-- an agent sends can come before it (an agent's own comment imitating the tag
-- comes after it and is ignored).
--
-- Mind: pg_stat_statements keeps ONE text per query id (the first one it saw),
-- so its totals cannot be split by agent: the same statement shape run by two
-- agents is one row. Per-agent totals (DB time, statements, rows) come from
-- guardproxy's own metrics (/metrics, SHOW AGENTS), not from these views.

CREATE SCHEMA IF NOT EXISTS guardproxy_monitoring;

-- The value of one key of the proxy's tag, the comment that starts a statement's text
-- (URL-decoding the common escapes).
CREATE OR REPLACE FUNCTION guardproxy_monitoring.tag(query text, key text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT replace(replace(replace(
        substring(substring(query FROM '^/\*([^*]*)\*/') FROM '(?:^|,)' || key || '=''([^'']*)'''),
        '%2C', ','), '%20', ' '), '%2F', '/')
$$;

-- Sessions of agents right now: who, which task, doing what, for how long.
CREATE OR REPLACE VIEW guardproxy_monitoring.agent_activity AS
SELECT pid,
       split_part(application_name, '/', 1)              AS agent,
       guardproxy_monitoring.tag(query, 'agent_type')    AS agent_type,
       guardproxy_monitoring.tag(query, 'task')          AS task,
       guardproxy_monitoring.tag(query, 'step')          AS step,
       state,
       now() - query_start                               AS running_for,
       now() - xact_start                                AS in_transaction_for,
       wait_event_type, wait_event,
       left(query, 200)                                  AS query
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND query ~ '^/\*[^*]*agent_type=';

-- Busy backends per agent type right now (a quick share of the database).
CREATE OR REPLACE VIEW guardproxy_monitoring.active_by_agent_type AS
SELECT agent_type, count(*) AS active, max(running_for) AS longest
FROM guardproxy_monitoring.agent_activity
WHERE state <> 'idle'
GROUP BY agent_type
ORDER BY active DESC;

-- Longest running agent statements (candidates for a lower statement_timeout).
CREATE OR REPLACE VIEW guardproxy_monitoring.slowest_agent_statements AS
SELECT * FROM guardproxy_monitoring.agent_activity
WHERE state = 'active'
ORDER BY running_for DESC NULLS LAST
LIMIT 20;

-- Statement shapes first seen from each agent type (pg_stat_statements, if installed).
-- One text per query id: the agent_type here is only that of the first agent that ran it.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_stat_statements') THEN
        EXECUTE $v$
            CREATE OR REPLACE VIEW guardproxy_monitoring.statements_first_seen_by_agent_type AS
            SELECT guardproxy_monitoring.tag(query, 'agent_type') AS first_agent_type,
                   calls, total_exec_time, mean_exec_time, rows, left(query, 200) AS query
            FROM pg_stat_statements
            WHERE query LIKE '%agent_type=%'
            ORDER BY total_exec_time DESC
        $v$;
    END IF;
END $$;
