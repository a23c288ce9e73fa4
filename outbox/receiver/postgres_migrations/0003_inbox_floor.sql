-- A bounded inbox on PostgreSQL (docs/protocol.md, "A bounded inbox"): the SQLite inbox's
-- inbox_floor (outbox/storage/migrations/0005), column for column. One row per client: ids in
-- [base, floor) were recorded, acked, then deleted, and a straggler among them is answered as
-- a duplicate. Shared by every receiver on the database: a group commit reads it in the same
-- statement as its dedup query, and a pruner changes it only with the client's outbox_fence
-- row locked FOR UPDATE (outbox/receiver/postgres.py, "The bounded inbox in a fleet").
CREATE TABLE inbox_floor (
    client_id   text             NOT NULL PRIMARY KEY,  -- the inbox's client_id
    base        bigint           NOT NULL,  -- the lowest id the floor covers; 0 = none
    floor       bigint           NOT NULL,  -- 0 with base 0: nothing deleted by the mark
    high_water  bigint           NOT NULL,  -- the highest id ever recorded (Outbox-High-Water)
    mark        bigint,                     -- the highest mark announced; NULL: time window
    updated_at  double precision NOT NULL   -- unix seconds, for people
);
