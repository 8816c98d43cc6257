/*
 * Scratch space of the cycle, reshaped so that the cycle never waits on
 * queue-db while it holds a lock in portfolio-db, and never overwrites a
 * change the application committed meanwhile.
 *
 *  - cm.stage holds what the cycle read from every source, before it takes
 *    any lock (the remote reads all happen first);
 *  - cm.batch then receives one source's rows at a time, as before;
 *  - cm.batch_account now carries, per account, the factors to apply and
 *    the scale of each column, not absolute new values: the account UPDATE
 *    computes each new value from the row it updates.
 */

CREATE UNLOGGED TABLE cm.stage (
    source_id        integer NOT NULL,
    pass             smallint NOT NULL,
    queue_id         bigint NOT NULL,
    uuid             text,
    accountid        text,
    transaction_type text,
    tier_1           numeric,
    tier_2           numeric,
    tier_3           numeric,
    status           text,
    created_at       timestamptz,
    updated_at       timestamptz
);
COMMENT ON TABLE cm.stage IS 'scratch table of the running sync cycle: the rows read from every source before any account is locked; always empty outside a cycle';
COMMENT ON COLUMN cm.stage.pass IS '0: a dead letter staged for another try; 1: a row read from queue-db (applied after the dead letters of its source)';
REVOKE ALL ON cm.stage FROM PUBLIC;

DROP TABLE cm.batch_account;
CREATE UNLOGGED TABLE cm.batch_account (
    accountid text NOT NULL,
    iv1 numeric, iv2 numeric, iv3 numeric,
    wd1 numeric, wd2 numeric, wd3 numeric,
    vs1 integer, vs2 integer, vs3 integer,
    as1 integer, as2 integer, as3 integer
);
COMMENT ON TABLE cm.batch_account IS 'scratch table of the running sync cycle: per account, the factors applied to the tier values (iv) and allocations (wd) and the scale of each column; always empty outside a cycle';
REVOKE ALL ON cm.batch_account FROM PUBLIC;
