-- Cron schedules: the spec and the last tick fired.
CREATE TABLE schedules (
    name      TEXT PRIMARY KEY,
    spec      TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    last_tick INTEGER NOT NULL
);
