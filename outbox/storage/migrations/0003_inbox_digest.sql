-- A message id is a promise: a repeat of (client id, message id) with other content is not a
-- resend but a conflict (an id reused by a restored outbox file, or a peer claiming someone
-- else's client id). The receiver keeps the SHA-256 of the payload JSON text it stored, as
-- lowercase hex, and compares it on every repeat. Rows recorded before this migration have
-- NULL here: the receiver then hashes their stored payload column instead, which holds the
-- same text, so they are checked exactly like newer rows.
ALTER TABLE inbox ADD COLUMN payload_sha256 TEXT;
