-- Full-text search over message contents and conversation titles: generated tsvector columns
-- with GIN indexes ('simple': no stemming, so every language is treated alike).
ALTER TABLE messages ADD COLUMN search tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED;
CREATE INDEX messages_search ON messages USING GIN (search);
ALTER TABLE conversations ADD COLUMN search tsvector
    GENERATED ALWAYS AS (to_tsvector('simple', COALESCE(title, ''))) STORED;
CREATE INDEX conversations_search ON conversations USING GIN (search);
