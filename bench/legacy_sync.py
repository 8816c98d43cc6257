#!/usr/bin/python3
"""bench/legacy_sync.py -- the row-at-a-time sync the extension replaces.

A re-creation, for the benchmark, of the old polling service's way of
working (Python + psycopg2, a timestamp kept in memory): list the queue rows
changed since the last poll, then for each row read it from queue-db, look
its transaction up in user-portfolio-db, upsert it, apply the tier-delta math
to the account when it became COMPLETED, and commit.

  --mode conn-per-row    opens a connection to both databases for every row
                         (the service as it ran in production)
  --mode commit-per-row  keeps one connection to each and commits per row

One pass over everything changed since the epoch, then exit; prints the
number of rows it handled.  Timing is done outside (/usr/bin/time -v).
"""

import argparse
import datetime
import decimal
import sys

import psycopg2

TABLES = (("investment_queue", "INVEST"), ("withdrawal_queue", "WITHDRAWAL"))
STATUS_MAP = {"PROCESSING": "PENDING"}


def connect(args, dbname):
    return psycopg2.connect(host=args.host, port=args.port, user=args.user, dbname=dbname)


def list_changed(qconn, table, since):
    """The poll: ids of the rows changed since the in-memory timestamp."""
    with qconn.cursor() as cur:
        cur.execute(f"SELECT queue_id FROM {table} WHERE updated_at > %s ORDER BY updated_at, queue_id",
                    (since,))
        return [r[0] for r in cur.fetchall()]


def sync_row(qconn, pconn, table, kind, queue_id):
    """Everything the old service did for one row, committed on its own."""
    with qconn.cursor() as cur:
        cur.execute(f"SELECT uuid, account_number, tier_1, tier_2, tier_3, status, created_at, updated_at"
                    f"  FROM {table} WHERE queue_id = %s", (queue_id,))
        row = cur.fetchone()
    qconn.commit()
    if row is None:
        return False
    uuid, account, t1, t2, t3, status, created_at, updated_at = row
    sign = 1 if kind == "INVEST" else -1
    c = [round(decimal.Decimal(t), 2) for t in (t1, t2, t3)]
    with pconn.cursor() as cur:
        cur.execute("SELECT status FROM portfolio_transactions WHERE id = %s", (uuid,))
        old = cur.fetchone()
        cur.execute(
            "INSERT INTO portfolio_transactions (id, accountid, transaction_type, tier1_change,"
            "       tier2_change, tier3_change, total_amount, status, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated_at = excluded.updated_at",
            (uuid, account, kind, sign * c[0], sign * c[1], sign * c[2], sign * sum(c),
             STATUS_MAP.get(status, status), created_at, updated_at))
        if status == "COMPLETED" and (old is None or old[0] != "COMPLETED"):
            cur.execute("SELECT pool_value, market_value FROM cm.tier_value ORDER BY tier")
            deltas = [(m - p) / p if p else decimal.Decimal(0) for p, m in cur.fetchall()]
            if kind == "INVEST":
                f = [1 + d for d in deltas]
                col = "value"
            else:
                f = [1 - d for d in deltas]
                col = "allocation"
            cur.execute(
                f"UPDATE user_portfolios SET tier1_{col} = round(tier1_{col} * %s, 2),"
                f"       tier2_{col} = round(tier2_{col} * %s, 2), tier3_{col} = round(tier3_{col} * %s, 2),"
                f"       total_{col} = round(tier1_{col} * %s, 2) + round(tier2_{col} * %s, 2)"
                f"                     + round(tier3_{col} * %s, 2)"
                f" WHERE accountid = %s", (*f, *f, account))
    pconn.commit()
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("conn-per-row", "commit-per-row"), required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--queue-db", default="queue")
    ap.add_argument("--portfolio-db", default="portfolio")
    args = ap.parse_args()

    since = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    done = 0
    qconn = connect(args, args.queue_db)
    work = [(t, k, i) for t, k in TABLES for i in list_changed(qconn, t, since)]
    qconn.close()

    if args.mode == "commit-per-row":
        qconn = connect(args, args.queue_db)
        pconn = connect(args, args.portfolio_db)
        for table, kind, queue_id in work:
            done += sync_row(qconn, pconn, table, kind, queue_id)
        qconn.close()
        pconn.close()
    else:
        for table, kind, queue_id in work:
            qconn = connect(args, args.queue_db)
            pconn = connect(args, args.portfolio_db)
            done += sync_row(qconn, pconn, table, kind, queue_id)
            qconn.close()
            pconn.close()
    print(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
