-- The turns of plain claims (see claim.rs): a claimer takes its queue's
-- turn with `LOCK TABLE {schema}.claim_turn_N IN EXCLUSIVE MODE`, N a hash
-- of the queue's name. A LOCK statement waits without taking a snapshot,
-- so claimers in line do not hold back the cleanup of the rows claims have
-- just left behind (waiting in `SELECT pg_advisory_xact_lock(...)` did,
-- for as long as the wait). Views: nothing is stored, only locked. Queues
-- whose names hash alike share a turn.
CREATE VIEW {schema}.claim_turn_0 AS SELECT 0 AS turn;
CREATE VIEW {schema}.claim_turn_1 AS SELECT 1 AS turn;
CREATE VIEW {schema}.claim_turn_2 AS SELECT 2 AS turn;
CREATE VIEW {schema}.claim_turn_3 AS SELECT 3 AS turn;
CREATE VIEW {schema}.claim_turn_4 AS SELECT 4 AS turn;
CREATE VIEW {schema}.claim_turn_5 AS SELECT 5 AS turn;
CREATE VIEW {schema}.claim_turn_6 AS SELECT 6 AS turn;
CREATE VIEW {schema}.claim_turn_7 AS SELECT 7 AS turn;
CREATE VIEW {schema}.claim_turn_8 AS SELECT 8 AS turn;
CREATE VIEW {schema}.claim_turn_9 AS SELECT 9 AS turn;
CREATE VIEW {schema}.claim_turn_10 AS SELECT 10 AS turn;
CREATE VIEW {schema}.claim_turn_11 AS SELECT 11 AS turn;
CREATE VIEW {schema}.claim_turn_12 AS SELECT 12 AS turn;
CREATE VIEW {schema}.claim_turn_13 AS SELECT 13 AS turn;
CREATE VIEW {schema}.claim_turn_14 AS SELECT 14 AS turn;
CREATE VIEW {schema}.claim_turn_15 AS SELECT 15 AS turn;
CREATE VIEW {schema}.claim_turn_16 AS SELECT 16 AS turn;
CREATE VIEW {schema}.claim_turn_17 AS SELECT 17 AS turn;
CREATE VIEW {schema}.claim_turn_18 AS SELECT 18 AS turn;
CREATE VIEW {schema}.claim_turn_19 AS SELECT 19 AS turn;
CREATE VIEW {schema}.claim_turn_20 AS SELECT 20 AS turn;
CREATE VIEW {schema}.claim_turn_21 AS SELECT 21 AS turn;
CREATE VIEW {schema}.claim_turn_22 AS SELECT 22 AS turn;
CREATE VIEW {schema}.claim_turn_23 AS SELECT 23 AS turn;
CREATE VIEW {schema}.claim_turn_24 AS SELECT 24 AS turn;
CREATE VIEW {schema}.claim_turn_25 AS SELECT 25 AS turn;
CREATE VIEW {schema}.claim_turn_26 AS SELECT 26 AS turn;
CREATE VIEW {schema}.claim_turn_27 AS SELECT 27 AS turn;
CREATE VIEW {schema}.claim_turn_28 AS SELECT 28 AS turn;
CREATE VIEW {schema}.claim_turn_29 AS SELECT 29 AS turn;
CREATE VIEW {schema}.claim_turn_30 AS SELECT 30 AS turn;
CREATE VIEW {schema}.claim_turn_31 AS SELECT 31 AS turn;
