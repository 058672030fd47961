-- The processes that wait for tasks to finish (Client::wait, long-polls),
-- each by its store handle's origin mark, until when. The NOTIFY that
-- announces finished tasks to other processes goes out only while some
-- other process waits: with a hundred nodes listening, each such NOTIFY made
-- PostgreSQL signal a hundred backends. See src/client/waiters.rs.
CREATE TABLE {schema}.waiting (
    origin text        PRIMARY KEY,
    until  timestamptz NOT NULL
);
