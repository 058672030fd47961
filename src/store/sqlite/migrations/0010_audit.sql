-- The audit trail: every state-changing operator action, who asked and how it went.
CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    token  TEXT    NOT NULL,
    remote TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT   NOT NULL
);
CREATE INDEX audit_at ON audit (at);
