-- The outbox: one row per message, committed before it is sent.
-- Ids come from AUTOINCREMENT so they are never reused, even after acked rows are purged:
-- receivers deduplicate by (client id, message id).
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    payload     TEXT    NOT NULL,                 -- the message as JSON text
    status      TEXT    NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'acked', 'dead')),
    attempts    INTEGER NOT NULL DEFAULT 0,       -- ack timeouts on a live connection
    created_at  REAL    NOT NULL,                 -- unix seconds
    updated_at  REAL    NOT NULL,                 -- last status or attempts change
    last_error  TEXT,                             -- why it was resent or became dead
    key         TEXT    UNIQUE                    -- optional idempotency key
);

-- The sender's scan: pending rows in id order, cheap however many acked rows there are.
CREATE INDEX outbox_pending ON outbox (id) WHERE status = 'pending';

-- Retention: the oldest acked rows first.
CREATE INDEX outbox_acked ON outbox (updated_at) WHERE status = 'acked';

-- Small facts about this database, such as the client id sent in the handshake.
CREATE TABLE outbox_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
