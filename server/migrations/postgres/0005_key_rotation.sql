-- `wadi admin rotate-signing-key` retires the signing keys in use and adds a new one. A retired
-- key signs nothing more but keeps verifying the tokens it signed until they expire; keys retired
-- longer ago than that are deleted at the next rotation.
ALTER TABLE auth_signing_keys ADD COLUMN retired_at BIGINT;
