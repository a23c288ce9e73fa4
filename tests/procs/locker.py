"""Hold a SQLite file's write lock from another process until told to let go.

    python tests/procs/locker.py DB

Takes the write lock (``BEGIN IMMEDIATE``), prints ``locked``, waits for a line (or EOF) on
stdin, rolls back, prints ``released``. This is what a second application, a backup tool or
an operator's open ``sqlite3`` shell in a transaction does to the file.
"""

from __future__ import annotations

import sqlite3
import sys

if __name__ == "__main__":
    conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
    print("released", flush=True)
