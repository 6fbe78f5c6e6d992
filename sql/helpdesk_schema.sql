-- A helpdesk: the second example schema, used by docs/quickstart-own-schema.md
-- and its test (tests/integration/test_quickstart_own_schema.py) to walk the
-- path from a database of one's own to a policy. It is not the shop of the
-- other examples on purpose: nothing in it was written with guardproxy in mind.
--
-- Load it as the owner of the application database:
--   psql -v ON_ERROR_STOP=1 -d helpdesk -f sql/helpdesk_schema.sql

BEGIN;

CREATE TABLE organizations (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    plan        text        NOT NULL DEFAULT 'free',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id               serial      PRIMARY KEY,
    organization_id  bigint      NOT NULL REFERENCES organizations (id),
    display_name     text        NOT NULL,
    email            text        NOT NULL UNIQUE,
    phone            text,
    password_hash    text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tickets (
    id               bigserial   PRIMARY KEY,
    organization_id  bigint      NOT NULL REFERENCES organizations (id),
    requester_id     integer     NOT NULL REFERENCES users (id),
    subject          text        NOT NULL,
    status           text        NOT NULL DEFAULT 'open'
        CHECK (status IN ('open', 'pending', 'solved', 'spam')),
    priority         smallint    NOT NULL DEFAULT 3,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX tickets_organization_id_idx ON tickets (organization_id);

CREATE TABLE comments (
    id          bigserial   PRIMARY KEY,
    ticket_id   bigint      NOT NULL REFERENCES tickets (id),
    author_id   integer     REFERENCES users (id),
    body        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX comments_ticket_id_idx ON comments (ticket_id);

CREATE TABLE refunds (
    id           bigint        GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id    bigint        NOT NULL REFERENCES tickets (id),
    amount       numeric(10,2) NOT NULL CHECK (amount > 0),
    reason       text          NOT NULL,
    approved_by  text,
    created_at   timestamptz   NOT NULL DEFAULT now()
);

INSERT INTO organizations (name, plan) VALUES ('Acme', 'pro'), ('Globex', 'free');
INSERT INTO users (organization_id, display_name, email, phone) VALUES
    (1, 'Wile E.', 'wile@acme.example', '+1 555 0100'),
    (1, 'Road Runner', 'beep@acme.example', NULL),
    (2, 'Hank Scorpio', 'hank@globex.example', '+1 555 0199');
INSERT INTO tickets (organization_id, requester_id, subject, status) VALUES
    (1, 1, 'Rocket skates exploded', 'open'),
    (1, 2, 'Birdseed out of stock', 'pending'),
    (1, 1, 'WIN A FREE CRUISE', 'spam'),
    (2, 3, 'Doomsday device warranty', 'open');
INSERT INTO comments (ticket_id, author_id, body) VALUES
    (1, 1, 'They exploded on the first use.'),
    (4, 3, 'Please advise.');
INSERT INTO refunds (ticket_id, amount, reason) VALUES (1, 49.90, 'defective skates');

COMMIT;
