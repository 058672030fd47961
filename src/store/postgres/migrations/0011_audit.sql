-- The audit trail: every state-changing operator action, who asked and how it went.
CREATE TABLE {schema}.audit (
    id      bigserial PRIMARY KEY,
    at      timestamptz NOT NULL,
    token   text        NOT NULL,
    remote  text        NOT NULL,
    action  text        NOT NULL,
    target  text        NOT NULL,
    status  integer     NOT NULL,
    outcome text        NOT NULL
);
CREATE INDEX audit_at ON {schema}.audit (at);
