-- Each conversation may pick its model (among those the operator allows) and its own system
-- prompt; NULL means the server's default.
ALTER TABLE conversations ADD COLUMN model TEXT;
ALTER TABLE conversations ADD COLUMN system_prompt TEXT;
