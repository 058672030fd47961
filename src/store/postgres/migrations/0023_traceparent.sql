-- The W3C trace context of the enqueue, continued by every attempt's
-- execution span (see src/telemetry.rs). NULL when there was none.
ALTER TABLE {schema}.tasks ADD COLUMN traceparent text;
