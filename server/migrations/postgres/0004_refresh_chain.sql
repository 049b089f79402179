-- A rotated refresh token keeps its successor sealed with a key derived from the rotated token
-- itself: whoever presents the old token can learn the session's current one (two tabs
-- refreshing with one token get the same child; a client that never saw the answer gets it
-- again), while the database alone reveals no usable token.
ALTER TABLE refresh_tokens ADD COLUMN next_token TEXT;
