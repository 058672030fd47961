-- Fencing by a claim token that only grows: every claim increments it, and
-- an outcome lands only under the token its run was claimed with.
ALTER TABLE tasks ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0;
