-- Several instances on one database: each process registers itself and heartbeats (database
-- time), each run records the instance that drives it, and a run whose instance stopped
-- heartbeating is reaped as `interrupted` by any other. `chunk_ends` (the byte offset where each
-- seq ends in `output`, comma-terminated) lets any instance replay a run's exact chunks from
-- here once the live log is gone.
CREATE TABLE instances (
    id UUID PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

ALTER TABLE runs ADD COLUMN owner_instance UUID;
ALTER TABLE runs ADD COLUMN stop_requested_at BIGINT;
ALTER TABLE runs ADD COLUMN chunk_ends TEXT NOT NULL DEFAULT '';
CREATE INDEX runs_running_owner ON runs (owner_instance) WHERE status = 'running';
DROP INDEX runs_status;
