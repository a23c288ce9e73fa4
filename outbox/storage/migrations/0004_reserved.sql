-- Reserved: number 4 belongs to a migration on another branch (the transactional-outbox work).
-- Migrations must be numbered 1..n without gaps, so this empty file holds the place for 0005
-- until that branch merges; then delete this file (two files numbered 4 fail loudly).
SELECT 1;  -- a statement that changes nothing (every migration has one)
