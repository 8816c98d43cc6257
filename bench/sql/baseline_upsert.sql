-- bench/sql/baseline_upsert.sql -- the bare set-based sync the catch-up
-- figure compares the cycle with: one INSERT ... SELECT ... ON CONFLICT of
-- every queue row into portfolio_transactions, with the id, the signed and
-- rounded amounts and the mapped status the cycle writes, and nothing else
-- (no validation, no ledger, no tier math, no watermark).
--
-- psql variables: inv and wd, the investment and withdrawal tables to read:
-- the foreign tables of cm_remote (baseline a) or local copies (baseline b).

INSERT INTO portfolio_transactions AS t
       (id, accountid, transaction_type, tier1_change, tier2_change, tier3_change,
        total_amount, status, created_at, updated_at)
SELECT q.uuid::uuid, q.account_number, q.kind,
       q.sgn * round(q.tier_1, 2), q.sgn * round(q.tier_2, 2), q.sgn * round(q.tier_3, 2),
       q.sgn * (round(q.tier_1, 2) + round(q.tier_2, 2) + round(q.tier_3, 2)),
       CASE q.status WHEN 'PROCESSING' THEN 'PENDING' ELSE q.status END,
       q.created_at, q.updated_at
  FROM (SELECT uuid, account_number, 'INVEST' AS kind, 1 AS sgn, tier_1, tier_2, tier_3,
               status, created_at, updated_at
          FROM :inv
        UNION ALL
        SELECT uuid, account_number, 'WITHDRAWAL', -1, tier_1, tier_2, tier_3,
               status, created_at, updated_at
          FROM :wd) q
ON CONFLICT (id) DO UPDATE
   SET accountid = excluded.accountid, transaction_type = excluded.transaction_type,
       tier1_change = excluded.tier1_change, tier2_change = excluded.tier2_change,
       tier3_change = excluded.tier3_change, total_amount = excluded.total_amount,
       status = excluded.status, updated_at = excluded.updated_at;
