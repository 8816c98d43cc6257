-- test/lib/helpers.sql -- included (\ir) by the pgTAP files after BEGIN.
--
-- Functions that turn a result into one line of text, so that a failing
-- assertion shows what differed; they live in pg_temp and go with the
-- transaction.

-- what one cm_sync_now() did
CREATE FUNCTION pg_temp.sync() RETURNS text LANGUAGE sql AS $$
    SELECT format('sources=%s rows_read=%s created=%s updated=%s completed_applied=%s compensated=%s dead_lettered=%s',
                  sources, rows_read, created, updated, completed_applied, compensated, dead_lettered)
      FROM cm_sync_now()
$$;

-- an account's tiers and totals
CREATE FUNCTION pg_temp.account(a text) RETURNS text LANGUAGE sql AS $$
    SELECT format('allocation %s+%s+%s=%s value %s+%s+%s=%s',
                  tier1_allocation, tier2_allocation, tier3_allocation, total_allocation,
                  tier1_value, tier2_value, tier3_value, total_value)
      FROM user_portfolios WHERE accountid = a
$$;

-- a portfolio_transactions row
CREATE FUNCTION pg_temp.tx(u text) RETURNS text LANGUAGE sql AS $$
    SELECT format('%s %s %s %s %s=%s %s', accountid, transaction_type,
                  tier1_change, tier2_change, tier3_change, total_amount, status)
      FROM portfolio_transactions WHERE id = u::uuid
$$;

-- a ledger row
CREATE FUNCTION pg_temp.ledger(u text) RETURNS text LANGUAGE sql AS $$
    SELECT format('%s %s applied=%s factors=%s,%s,%s', kind, status, applied::text,
                  coalesce(factor1::text, 'NULL'), coalesce(factor2::text, 'NULL'),
                  coalesce(factor3::text, 'NULL'))
      FROM cm.ledger WHERE uuid = u::uuid
$$;

-- cm_attach_queue makes the foreign tables read-only (queue-db is never
-- written by the extension); the tests write their queue rows through them,
-- inside their transaction, so they switch that off again
CREATE FUNCTION pg_temp.queue_writable() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t regclass;
BEGIN
    FOR t IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'cm_remote' AND c.relkind = 'f'
    LOOP
        EXECUTE format('ALTER FOREIGN TABLE %s OPTIONS (SET updatable %L)', t, 'true');
    END LOOP;
END
$$;

-- The tests stamp updated_at with now() of their own (local) transaction, as
-- an application writing its own clock would: older than the remote
-- transaction that writes the row.  The margin such applications need:
SET LOCAL consistency_manager.lookback_window = '1h';
