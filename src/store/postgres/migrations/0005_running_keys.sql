-- Running counts per (queue, concurrency key), kept by claims and completions.
CREATE TABLE {schema}.running_keys (
    queue text    NOT NULL,
    key   text    NOT NULL,
    n     integer NOT NULL,
    PRIMARY KEY (queue, key)
);
INSERT INTO {schema}.running_keys (queue, key, n)
    SELECT queue, concurrency_key, count(*) FROM {schema}.tasks
    WHERE state = 'running' AND concurrency_key IS NOT NULL GROUP BY 1, 2;
