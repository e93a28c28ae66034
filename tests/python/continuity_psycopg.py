"""A psycopg session through three forced backend lifetimes.

Run by tests/tests/continuity.rs with the proxy's address in DSN. It sets
session state, prepares statements both ways (psycopg's own protocol-level
prepared statements with prepare_threshold=0, and SQL PREPARE), then checks
every value and runs every statement after each move. Exit status 0 means
no error was seen.
"""

import os
import sys
import time

import psycopg


def main() -> int:
    conn = psycopg.connect(os.environ["DSN"], autocommit=True, prepare_threshold=0)
    cur = conn.cursor()
    cur.execute("set search_path = psy_s, public")
    cur.execute("set timezone = 'America/New_York'")
    cur.execute("set statement_timeout = '6s'")
    cur.execute("prepare sql_add (int, int) as select $1 + $2")
    pids = []
    moves = int(os.environ.get("MOVES", "3"))
    for round_ in range(moves + 1):
        pid = cur.execute("select pg_backend_pid()").fetchone()[0]
        pids.append(pid)
        assert cur.execute("show search_path").fetchone()[0] == "psy_s, public"
        assert cur.execute("show timezone").fetchone()[0] == "America/New_York"
        assert cur.execute("show statement_timeout").fetchone()[0] == "6s"
        assert cur.execute("execute sql_add(40, 2)").fetchone()[0] == 42
        # A protocol-level prepared statement (prepare_threshold=0).
        got = cur.execute("select %s::int * 2", (round_,), prepare=True).fetchone()[0]
        assert got == round_ * 2, got
        if round_ < moves:
            time.sleep(float(os.environ.get("WAIT", "1.6")))
    if len(set(pids)) < moves + 1:
        print(f"expected {moves} moves, backend pids: {pids}", file=sys.stderr)
        return 1
    print(f"ok: backend pids {pids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
