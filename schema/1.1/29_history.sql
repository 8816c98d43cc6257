/*
 * What else a cycle did, in its history row: requests adopted from
 * portfolio_transactions (22_cycle_scratch.sql, the cycle's comparison with
 * the ledger), and how often its local phase was retried after a deadlock,
 * a serialization failure or a lock timeout.
 */

ALTER TABLE cm.cycle_history
    ADD COLUMN adopted bigint NOT NULL DEFAULT 0,
    ADD COLUMN lock_retries integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN cm.cycle_history.adopted IS 'requests the ledger did not know but portfolio_transactions held, taken into the ledger (applied when their status is the one COMPLETED maps to), never applied again';
COMMENT ON COLUMN cm.cycle_history.lock_retries IS 'times the cycle''s local phase was retried at once after a deadlock, a serialization failure or a lock timeout (what was read from queue-db was reused)';
