-- Conversations, their messages, and the runs (model answers) they start.
-- owner_id is the auth user's id; there is no foreign key to users because Supabase users live
-- in Supabase, not here.
CREATE TABLE conversations (
    id UUID PRIMARY KEY,
    owner_id UUID NOT NULL,
    -- NULL until set, or until the first message names it.
    title TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX conversations_owner_recent ON conversations (owner_id, updated_at DESC, id DESC);

CREATE TABLE messages (
    id UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    run_id UUID,
    client_message_id TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (conversation_id, client_message_id)
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);

CREATE TABLE runs (
    id UUID PRIMARY KEY,
    conversation_id UUID NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    owner_id UUID NOT NULL,
    message_id UUID NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    output TEXT NOT NULL DEFAULT '',
    error TEXT,
    prompt_tokens BIGINT,
    completion_tokens BIGINT,
    last_seq BIGINT NOT NULL DEFAULT 0,
    started_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX runs_conversation ON runs (conversation_id);
CREATE INDEX runs_status ON runs (status);
-- At most one running run per conversation, enforced by the database so that it holds across
-- instances too.
CREATE UNIQUE INDEX runs_one_active ON runs (conversation_id) WHERE status = 'running';
