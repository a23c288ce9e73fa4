-- The inbox: the receiver's record of every message it has handled, one row per sender and
-- message id. A resend finds its row here and is answered again (ack, or nack with the
-- recorded reason) without being handled a second time. The row is written in the same
-- transaction as the handler's own writes, so both commit or neither does.
CREATE TABLE inbox (
    client_id      TEXT    NOT NULL,   -- who sent it: Outbox-Client-Id, or see docs/protocol.md
    message_id     INTEGER NOT NULL,   -- the sender's outbox row id
    payload        TEXT    NOT NULL,   -- the message's data as JSON text
    received_at    REAL    NOT NULL,   -- unix seconds, when its transaction ran
    reject_reason  TEXT,               -- NULL: handled and acked; else why it was nacked
    PRIMARY KEY (client_id, message_id)
) WITHOUT ROWID;
