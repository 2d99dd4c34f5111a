-- Shared by every peer type; installed before the peer type's generated.sql. Idempotent.
-- Run by the owner role of the machinery (peer/dejima/install.py); what each other role may do with these objects is
-- granted by install, never here. Every function is `$dejima$`-quoted: the peer compares each one with what it finds
-- in the database at start and repairs what differs (peer/dejima/machinery.py).
--
-- The capture triggers append to dejima.delta; the peer service reads (and deletes) its gxid's rows in the same
-- transaction, so rows never outlive the transaction that wrote them.
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

-- What a participant finished here, so that no message can open a global transaction again once it committed or
-- aborted here, across restarts (peer/dejima/coordinator.py `_refusal`): 'committed' is inserted by end_global in
-- the transaction the participant then prepares (it is there once that transaction commits), 'aborted' by the peer
-- right after a rollback. dejima.begin_global refuses a gxid found here. Rows older than the transaction timeout
-- plus twice the replay window are deleted: a gxid that old is refused by its start time alone.
CREATE TABLE IF NOT EXISTS dejima.finished (
    gxid text PRIMARY KEY,
    outcome text NOT NULL CHECK (outcome IN ('committed', 'aborted')),
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS finished_at ON dejima.finished (at);

-- Tamper evidence (peer/dejima/txlog.py): a hash-chained log of the global transactions this peer committed that
-- changed its data. The entry is staged in dejima.txlog_pending inside the transaction that commits the change
-- (origin: with the decision row; participant: before PREPARE TRANSACTION), without any lock; once committed, the
-- peer's sealer links staged entries into the chain in batches. hash = sha256(prev_hash || canonical entry);
-- `dejima check` verifies it. `witness`: the log heads of the partners of that global transaction as they told
-- them (the origin's entry: each participant's; a participant's: the origin's), chained with the rest, so that
-- `dejima check` can compare every peer's chain with what its partners recorded of it.
CREATE TABLE IF NOT EXISTS dejima.txlog_pending (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gxid text NOT NULL,
    origin text NOT NULL,
    role text NOT NULL CHECK (role IN ('origin', 'participant')),
    views jsonb NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    witness jsonb
);
CREATE TABLE IF NOT EXISTS dejima.txlog (
    seq bigint PRIMARY KEY,
    gxid text NOT NULL UNIQUE,
    origin text NOT NULL,
    role text NOT NULL CHECK (role IN ('origin', 'participant')),
    views jsonb NOT NULL,
    committed_at timestamptz NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL,
    witness jsonb
);
ALTER TABLE dejima.txlog_pending ADD COLUMN IF NOT EXISTS witness jsonb;
ALTER TABLE dejima.txlog ADD COLUMN IF NOT EXISTS witness jsonb;

-- The database transactions that belong to a global transaction, by transaction id: registered by the peer service
-- first thing in the transaction (dejima.begin_global), unregistered last (dejima.commit_point / dejima.end_global),
-- so a row is never visible outside its own transaction. The capture triggers read the gxid here; a client's SQL,
-- which runs in that same transaction under a role with no privilege on this table, can neither change it nor
-- unregister. Every function that reads or ends what the transaction captured takes the transaction's token, which
-- only the peer service knows (its sha256 is registered here); the client's SQL never sees it.
CREATE TABLE IF NOT EXISTS dejima.active (
    xid xid8 PRIMARY KEY,
    gxid text NOT NULL CHECK (gxid <> ''),
    token_sha256 bytea NOT NULL CHECK (length(token_sha256) = 32)
);

-- The gxid of the current transaction, when the peer service registered it (else NULL).
CREATE OR REPLACE FUNCTION dejima.current_gxid() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
SELECT a.gxid FROM dejima.active AS a WHERE a.xid = pg_current_xact_id_if_assigned()
$dejima$;

-- Register the current transaction as part of global transaction p_gxid, with the sha256 of its token. A gxid that
-- committed or aborted here already (dejima.finished) is refused with SQLSTATE DJ001: it never runs twice.
CREATE OR REPLACE FUNCTION dejima.begin_global(p_gxid text, p_token_sha256 bytea) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
DECLARE
    done text;
BEGIN
    IF EXISTS (SELECT 1 FROM dejima.active AS a WHERE a.xid = pg_current_xact_id()) THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = 'dejima: this transaction belongs to a global transaction already';
    END IF;
    SELECT f.outcome INTO done FROM dejima.finished AS f WHERE f.gxid = p_gxid;
    IF done IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'DJ001',
            MESSAGE = format('dejima: global transaction %s was %s here already', p_gxid, done);
    END IF;
    INSERT INTO dejima.active (xid, gxid, token_sha256) VALUES (pg_current_xact_id(), p_gxid, p_token_sha256);
END
$dejima$;

-- The gxid of the current transaction when p_token is its token; else an insufficient_privilege error.
CREATE OR REPLACE FUNCTION dejima.own_gxid(p_token bytea) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
DECLARE
    found_gxid text;
BEGIN
    SELECT a.gxid INTO found_gxid FROM dejima.active AS a
        WHERE a.xid = pg_current_xact_id_if_assigned() AND a.token_sha256 = sha256(p_token);
    IF found_gxid IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'insufficient_privilege',
            MESSAGE = 'dejima: not the token of a global transaction running in this transaction';
    END IF;
    RETURN found_gxid;
END
$dejima$;

-- Remove and return what the capture triggers recorded in this transaction so far, in capture order.
CREATE OR REPLACE FUNCTION dejima.take_delta(p_token bytea)
RETURNS TABLE (view_name text, row_id bigint, old_row jsonb, new_row jsonb)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
#variable_conflict use_column
DECLARE
    own text := dejima.own_gxid(p_token);
BEGIN
    RETURN QUERY
        WITH taken AS (
            DELETE FROM dejima.delta AS d WHERE d.gxid = own
            RETURNING d.seq, d.view_name, d.row_id, d.old_row, d.new_row
        )
        SELECT t.view_name, t.row_id, t.old_row, t.new_row FROM taken AS t ORDER BY t.seq;
END
$dejima$;

-- The origin's commit point, in the transaction that then commits: the decision row, the txlog entry (p_views NULL:
-- none) with the participants' log heads (p_witness) and the end of the registration.
DROP FUNCTION IF EXISTS dejima.commit_point(bytea, text[], text, jsonb);
CREATE OR REPLACE FUNCTION dejima.commit_point(
    p_token bytea, p_participants text[], p_origin text, p_views jsonb, p_witness jsonb
)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
DECLARE
    own text := dejima.own_gxid(p_token);
BEGIN
    INSERT INTO dejima.decisions (gxid, participants) VALUES (own, p_participants);
    IF p_views IS NOT NULL THEN
        INSERT INTO dejima.txlog_pending (gxid, origin, role, views, witness)
            VALUES (own, p_origin, 'origin', p_views, p_witness);
    END IF;
    DELETE FROM dejima.active AS a WHERE a.xid = pg_current_xact_id();
END
$dejima$;

-- The end of a global transaction's work in this transaction before it commits or is prepared: its txlog entry
-- (p_views NULL: none) with the origin's log head (p_witness), at a participant the gxid as finished here (it is
-- there once this transaction commits: dejima.begin_global refuses it from then on), and the end of the registration.
DROP FUNCTION IF EXISTS dejima.end_global(bytea, text, text, jsonb);
CREATE OR REPLACE FUNCTION dejima.end_global(p_token bytea, p_origin text, p_role text, p_views jsonb, p_witness jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dejima$
DECLARE
    own text := dejima.own_gxid(p_token);
BEGIN
    IF p_views IS NOT NULL THEN
        INSERT INTO dejima.txlog_pending (gxid, origin, role, views, witness)
            VALUES (own, p_origin, p_role, p_views, p_witness);
    END IF;
    IF p_role = 'participant' THEN
        INSERT INTO dejima.finished (gxid, outcome) VALUES (own, 'committed');
    END IF;
    DELETE FROM dejima.active AS a WHERE a.xid = pg_current_xact_id();
END
$dejima$;

-- API tokens (peer/dejima/tokens.py): who may use this peer's client API; only the sha256 (hex) of a token is kept.
CREATE TABLE IF NOT EXISTS dejima.api_tokens (
    name text PRIMARY KEY,
    scopes text[] NOT NULL,
    token_sha256 text NOT NULL UNIQUE,
    source text NOT NULL DEFAULT 'command',   -- 'command' (management command / kit) | 'file' (DEJIMA_API_TOKENS_FILE)
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
