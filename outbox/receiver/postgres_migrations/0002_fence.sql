-- Fencing for a fleet of receivers on one database: each identity's current epoch. A
-- connection takes a new epoch at its handshake (epoch + 1, waiting for the row lock of any
-- group commit in flight for that identity); every group commit locks the rows of the
-- identities it carries (FOR SHARE) and drops the work of a connection whose epoch is older.
CREATE TABLE outbox_fence (
    client_id  text        NOT NULL PRIMARY KEY,
    epoch      bigint      NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()  -- for people: when the epoch was taken
);
