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
