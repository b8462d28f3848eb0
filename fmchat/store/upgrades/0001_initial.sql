-- Schema version 0 -> 1: sessions and their messages.
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    title_set INTEGER NOT NULL DEFAULT 0,       -- 1 once the user renamed it
    created REAL NOT NULL,                      -- unix seconds
    updated REAL NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}',        -- JSON object: the settings the chat ran with
    system TEXT,                                -- system prompt (NULL: none)
    window_start INTEGER NOT NULL DEFAULT 0,    -- memory policy: messages before this left the window
    memory_note TEXT NOT NULL DEFAULT ''        -- memory policy: summary of the dropped turns
);
CREATE TABLE messages (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,                       -- 0, 1, 2... within the session
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    created REAL NOT NULL,
    cancelled INTEGER NOT NULL DEFAULT 0,
    stats TEXT,                                 -- JSON object (TurnStats.to_dict()) or NULL
    token_ids TEXT,                             -- JSON list of the sampled ids (assistant) or NULL
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX sessions_updated ON sessions(updated DESC);
