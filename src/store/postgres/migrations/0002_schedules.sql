-- Cron schedules: the spec and the last tick fired.
CREATE TABLE {schema}.schedules (
    name      text PRIMARY KEY,
    spec      jsonb       NOT NULL,
    source    text        NOT NULL,
    last_tick timestamptz NOT NULL
);
