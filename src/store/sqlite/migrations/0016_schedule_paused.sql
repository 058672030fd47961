-- A paused schedule fires nothing (its ticks pass unenqueued) until resumed.
ALTER TABLE schedules ADD COLUMN paused INTEGER NOT NULL DEFAULT 0;
