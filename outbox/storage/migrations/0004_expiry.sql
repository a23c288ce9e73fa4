-- Per-message expiry: send(payload, ttl=...). A row not acked by its deadline becomes expired.
-- expires_at: unix seconds (for people, and for any process that opens the file); the process
-- that sends decides by its monotonic clock, anchored to the wall clock once when it opened
-- (see outbox/client/expiry.py). NULL: never expires.
ALTER TABLE outbox ADD COLUMN expires_at REAL;

-- status keeps the values of 0001 (its CHECK cannot change without rebuilding the table): an
-- expired row is stored as status 'dead' with expired = 1, and read everywhere as 'expired'.
ALTER TABLE outbox ADD COLUMN expired INTEGER NOT NULL DEFAULT 0;

-- The sweep's question, "which pending rows are past their deadline", and the next deadline.
CREATE INDEX outbox_expiring ON outbox (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;
