-- A paused schedule fires nothing (its ticks pass unenqueued) until resumed.
ALTER TABLE {schema}.schedules ADD COLUMN paused boolean NOT NULL DEFAULT false;
