-- A bounded inbox (docs/protocol.md, "A bounded inbox"). The receiver deletes a client's inbox
-- rows below the low-water mark the client announced, and keeps this one row per client so
-- that a straggler below the floor is still answered as a duplicate, not handled again.
CREATE TABLE inbox_floor (
    client_id   TEXT    PRIMARY KEY,  -- the inbox's client_id (the deduplication key)
    base        INTEGER NOT NULL,     -- ids in [base, floor) were recorded, acked, then deleted
    floor       INTEGER NOT NULL,     -- 0 with base 0: nothing deleted by the mark
    high_water  INTEGER NOT NULL,     -- the highest id ever recorded (Outbox-High-Water)
    mark        INTEGER,              -- the highest mark announced; NULL: the time window applies
    updated_at  REAL    NOT NULL      -- unix seconds, for people
) WITHOUT ROWID;

-- The client's low-water mark is the lowest row not acked, pending or dead: one descent of
-- this index and one of outbox_pending, however many rows the outbox holds.
CREATE INDEX outbox_dead ON outbox (id) WHERE status = 'dead';
