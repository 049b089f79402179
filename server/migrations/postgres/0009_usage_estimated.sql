-- Usage of a run that ended before the provider reported it (stopped, failed, interrupted) is
-- counted by the server with the model's tokenizer: an estimate, and marked as one.
ALTER TABLE runs ADD COLUMN usage_estimated BOOLEAN NOT NULL DEFAULT FALSE;
