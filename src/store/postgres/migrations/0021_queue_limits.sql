-- Every queue setting shared by the cluster beside max_depth, as JSON
-- (workers, global_concurrency, per_key_concurrency, rate_limit,
-- fairness). NULL: never written; the nodes' configs give the limits.
ALTER TABLE {schema}.queue_settings ADD COLUMN limits jsonb;
