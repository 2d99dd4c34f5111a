-- Shared by every peer type; installed before the peer type's generated.sql. Idempotent.
-- The capture triggers append here; the peer service reads (and deletes) its gxid's rows in the same transaction,
-- so rows never outlive the transaction that wrote them.
CREATE SCHEMA IF NOT EXISTS dejima;

CREATE TABLE IF NOT EXISTS dejima.delta (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    gxid text NOT NULL,
    view_name text NOT NULL,
    row_id bigint NOT NULL,
    old_row jsonb,
    new_row jsonb
);
CREATE INDEX IF NOT EXISTS delta_gxid ON dejima.delta (gxid);

-- Which peer type (and manifest hashes) this database holds; written by install.
CREATE TABLE IF NOT EXISTS dejima.installed (
    peer_type text PRIMARY KEY,
    sql_sha256 text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- Discovery: the peers this peer knows and the dejima groups it belongs to (rewritten by the peer service).
CREATE TABLE IF NOT EXISTS dejima.peers (
    name text PRIMARY KEY,
    url text NOT NULL,
    peer_type text NOT NULL DEFAULT '',
    catalog jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'unknown',
    incompatible jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS dejima.groups (
    view_name text NOT NULL,
    peer text NOT NULL,
    PRIMARY KEY (view_name, peer)
);
CREATE TABLE IF NOT EXISTS dejima.state (
    key text PRIMARY KEY,
    value jsonb NOT NULL
);

-- The origin's durable decision: inserted in the origin's own transaction, whose commit is the commit point.
-- A gxid without a row here, and no longer running at its origin, was aborted (presumed abort).
CREATE TABLE IF NOT EXISTS dejima.decisions (
    gxid text PRIMARY KEY,
    participants text[] NOT NULL,
    decided_at timestamptz NOT NULL DEFAULT now()
);

-- Tamper evidence (peer/dejima/txlog.py): a hash-chained log of the global transactions this peer committed that
-- changed its data. The entry is staged in dejima.txlog_pending inside the transaction that commits the change
-- (origin: with the decision row; participant: before PREPARE TRANSACTION), without any lock; once committed, the
-- peer's sealer links staged entries into the chain in batches. hash = sha256(prev_hash || canonical entry);
-- `dejima check` verifies it.
CREATE TABLE IF NOT EXISTS dejima.txlog_pending (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gxid text NOT NULL,
    origin text NOT NULL,
    role text NOT NULL CHECK (role IN ('origin', 'participant')),
    views jsonb NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS dejima.txlog (
    seq bigint PRIMARY KEY,
    gxid text NOT NULL UNIQUE,
    origin text NOT NULL,
    role text NOT NULL CHECK (role IN ('origin', 'participant')),
    views jsonb NOT NULL,
    committed_at timestamptz NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);

-- API tokens (peer/dejima/tokens.py): who may use this peer's client API; only the sha256 (hex) of a token is kept.
CREATE TABLE IF NOT EXISTS dejima.api_tokens (
    name text PRIMARY KEY,
    scopes text[] NOT NULL,
    token_sha256 text NOT NULL UNIQUE,
    source text NOT NULL DEFAULT 'command',   -- 'command' (management command / kit) | 'file' (DEJIMA_API_TOKENS_FILE)
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
