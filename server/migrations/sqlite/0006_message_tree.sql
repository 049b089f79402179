-- Messages form a tree: each has the message it follows (NULL for a conversation's first). A
-- regenerated answer is another child of the same user message; an edited message is another
-- child of the same parent. Nothing is ever deleted. Existing conversations are one path: each
-- message follows the one before it (ids are time-ordered UUIDv7).
ALTER TABLE messages ADD COLUMN parent_id BLOB;
UPDATE messages SET parent_id = (
    SELECT p.id FROM messages p
    WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id
    ORDER BY p.id DESC LIMIT 1
);
CREATE INDEX messages_parent ON messages (parent_id);
