-- The inbox on PostgreSQL: the receiver's record of every message it has handled, one row per
-- identity and message id, written in the same transaction as the handler's own writes (the
-- SQLite inbox's table, outbox/storage/migrations/0002 and 0003, column for column).
CREATE TABLE inbox (
    client_id      text             NOT NULL,  -- the identity (docs/protocol.md, "Receiver")
    message_id     bigint           NOT NULL,  -- the sender's outbox row id
    payload        text             NOT NULL,  -- the message's data as JSON text
    received_at    double precision NOT NULL,  -- unix seconds, when its transaction ran
    reject_reason  text,                       -- NULL: handled and acked; else why it was nacked
    payload_sha256 text             NOT NULL,  -- SHA-256 of payload, lowercase hex: a repeat
                                               -- with another digest is a conflict
    PRIMARY KEY (client_id, message_id)
);
