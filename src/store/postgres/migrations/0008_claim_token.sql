-- Fencing by a claim token that only grows: every claim increments it, and
-- an outcome lands only under the token its run was claimed with.
ALTER TABLE {schema}.tasks ADD COLUMN claim_token bigint NOT NULL DEFAULT 0;
