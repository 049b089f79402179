-- Several instances on one database: each process registers itself and heartbeats (database
-- time), each run records the instance that drives it, and a run whose instance stopped
-- heartbeating is reaped as `interrupted`. On SQLite there is only ever one live instance, but
-- the rules are the same, so a restart recovers what a crash left. `chunk_ends` (the byte offset
-- where each seq ends in `output`, comma-terminated) replays a run's exact chunks from here.
CREATE TABLE instances (
    id BLOB PRIMARY KEY NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
);

ALTER TABLE runs ADD COLUMN owner_instance BLOB;
ALTER TABLE runs ADD COLUMN stop_requested_at INTEGER;
ALTER TABLE runs ADD COLUMN chunk_ends TEXT NOT NULL DEFAULT '';
CREATE INDEX runs_running_owner ON runs (owner_instance) WHERE status = 'running';
DROP INDEX runs_status;
