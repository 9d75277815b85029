-- sealpost relay ledger on PostgreSQL (issue 16): the same truth as the
-- embedded SQLite ledger (schema.rs), shared by every relay node on one
-- database. Run at every node's start, under an advisory lock, so it is
-- idempotent. Every write is one call of a function below: one statement,
-- one transaction, committed (synchronous_commit = on) before the relay
-- answers. Rows a write spends from (a mailbox's quota, a source's share,
-- the mailbox count) are locked first, mailboxes always in ascending id
-- order, so concurrent writes on any node serialise and never deadlock.

CREATE TABLE IF NOT EXISTS sealpost_meta (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO sealpost_meta (name, value) VALUES ('schema', 1), ('mailboxes', 0)
    ON CONFLICT (name) DO NOTHING;

-- Migrations of a single relay's embedded store into this database
-- (`sealpost relay migrate`): while one has not finished, nodes refuse to
-- start on the database.
CREATE TABLE IF NOT EXISTS sealpost_migrations (
    id bytea PRIMARY KEY,
    started_at bigint NOT NULL,
    finished_at bigint
);
-- where that migration put blob bytes (a later run must name the same)
ALTER TABLE sealpost_migrations ADD COLUMN IF NOT EXISTS blobs text;

CREATE TABLE IF NOT EXISTS mailboxes (
    id bytea PRIMARY KEY,
    key bytea NOT NULL,
    quota bigint NOT NULL,
    used bigint NOT NULL DEFAULT 0,
    created_at bigint NOT NULL,
    -- the seq of the mailbox's last item: seqs are per mailbox, taken under
    -- the mailbox's row lock, so they increase in commit order (a fetch
    -- "after n" never skips an item that commits later with a lower seq)
    last_seq bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS items (
    mailbox bytea NOT NULL,
    seq bigint NOT NULL,
    item_id bytea NOT NULL,
    received_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    hash bytea NOT NULL,
    payload bytea NOT NULL,
    source bytea,
    PRIMARY KEY (mailbox, seq)
);
-- sealed payloads do not compress: store them out of line, uncompressed
ALTER TABLE items ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS items_expiry ON items (expires_at);

CREATE TABLE IF NOT EXISTS blobs (
    id bytea PRIMARY KEY,
    mailbox bytea NOT NULL,
    total_len bigint NOT NULL,
    hash bytea NOT NULL,
    expires_at bigint NOT NULL,
    stored bigint NOT NULL,
    complete boolean NOT NULL,
    source bytea
);
CREATE INDEX IF NOT EXISTS blobs_expiry ON blobs (expires_at);

CREATE TABLE IF NOT EXISTS shares (
    mailbox bytea NOT NULL,
    source bytea NOT NULL,
    used bigint NOT NULL,
    PRIMARY KEY (mailbox, source)
);

CREATE TABLE IF NOT EXISTS forwards (
    id bigserial PRIMARY KEY,
    origin bytea NOT NULL,
    next_addr text NOT NULL,
    next_pin bytea NOT NULL,
    hops integer NOT NULL,
    mailbox bytea NOT NULL,
    received_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    hash bytea NOT NULL,
    payload bytea NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_at bigint NOT NULL,
    last_error text,
    blob bytea,
    blob_len bigint NOT NULL DEFAULT 0
);
ALTER TABLE forwards ALTER COLUMN payload SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS forwards_due ON forwards (next_at);
CREATE INDEX IF NOT EXISTS forwards_item ON forwards (origin, hash);
CREATE UNIQUE INDEX IF NOT EXISTS forwards_blob ON forwards (blob, mailbox)
    WHERE blob IS NOT NULL;

CREATE TABLE IF NOT EXISTS handed (
    id bigint PRIMARY KEY,
    origin bytea NOT NULL,
    next_addr text NOT NULL,
    next_pin bytea NOT NULL,
    mailbox bytea NOT NULL,
    hash bytea NOT NULL,
    blob bytea,
    until bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS handed_item ON handed (mailbox, hash);
CREATE INDEX IF NOT EXISTS handed_until ON handed (until);

-- Which node hands each lane (a next relay's items, or its blobs) on, and
-- until when (a lease the node renews while it works; a node that died
-- loses its lanes when the lease runs out).
CREATE TABLE IF NOT EXISTS forward_lanes (
    next_addr text NOT NULL,
    next_pin bytea NOT NULL,
    blobs boolean NOT NULL,
    node bigint NOT NULL,
    until bigint NOT NULL,
    PRIMARY KEY (next_addr, next_pin, blobs)
);

-- The bytes of a mailbox of quota q that one source may hold (Limits::
-- source_share, pct already clamped to 1..=100).
CREATE OR REPLACE FUNCTION sp_share(q bigint, pct integer) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN pct >= 100 THEN q ELSE q / 100 * pct + q % 100 * pct / 100 END
$$;

CREATE OR REPLACE FUNCTION sp_charge_share(p_mb bytea, p_src bytea, p_delta bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO shares (mailbox, source, used) VALUES (p_mb, p_src, p_delta)
    ON CONFLICT (mailbox, source) DO UPDATE SET used = shares.used + excluded.used
$$;

CREATE OR REPLACE FUNCTION sp_release_share(p_mb bytea, p_src bytea, p_delta bigint)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_src IS NULL THEN
        RETURN;
    END IF;
    UPDATE shares SET used = used - p_delta WHERE mailbox = p_mb AND source = p_src;
    DELETE FROM shares WHERE mailbox = p_mb AND source = p_src AND used <= 0;
END $$;

-- Stores an item in a mailbox whose row the caller locked, counting its
-- bytes in the mailbox's use; its seq (NULL: no such mailbox).
CREATE OR REPLACE FUNCTION sp_store_item(p_mb bytea, p_item_id bytea, p_now bigint,
    p_exp bigint, p_hash bytea, p_payload bytea, p_src bytea)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    s bigint;
BEGIN
    UPDATE mailboxes SET used = used + length(p_payload), last_seq = last_seq + 1
        WHERE id = p_mb RETURNING last_seq INTO s;
    IF s IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO items (mailbox, seq, item_id, received_at, expires_at, hash, payload, source)
        VALUES (p_mb, s, p_item_id, p_now, p_exp, p_hash, p_payload, p_src);
    RETURN s;
END $$;

-- 0 created, 1 existing, 2 full (the cap is checked under the count's
-- row lock, so registrations on several nodes cannot pass it together).
CREATE OR REPLACE FUNCTION sp_register(p_id bytea, p_key bytea, p_quota bigint,
    p_now bigint, p_cap bigint)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    PERFORM 1 FROM mailboxes WHERE id = p_id;
    IF FOUND THEN
        RETURN 1;
    END IF;
    SELECT value INTO n FROM sealpost_meta WHERE name = 'mailboxes' FOR UPDATE;
    PERFORM 1 FROM mailboxes WHERE id = p_id;
    IF FOUND THEN
        RETURN 1;
    END IF;
    IF n >= p_cap THEN
        RETURN 2;
    END IF;
    INSERT INTO mailboxes (id, key, quota, created_at) VALUES (p_id, p_key, p_quota, p_now);
    UPDATE sealpost_meta SET value = value + 1 WHERE name = 'mailboxes';
    RETURN 0;
END $$;

CREATE OR REPLACE FUNCTION sp_ack(p_mb bytea, p_seqs bigint[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r record;
    n integer := 0;
    freed bigint := 0;
BEGIN
    PERFORM 1 FROM mailboxes WHERE id = p_mb FOR UPDATE;
    FOR r IN DELETE FROM items WHERE mailbox = p_mb AND seq = ANY (p_seqs)
        RETURNING length(payload) AS l, source
    LOOP
        n := n + 1;
        freed := freed + r.l;
        PERFORM sp_release_share(p_mb, r.source, r.l);
    END LOOP;
    UPDATE mailboxes SET used = GREATEST(0, used - freed) WHERE id = p_mb;
    RETURN n;
END $$;

-- o_kind: 0 committed, 1 conflict (o_stored: the length now, NULL if no
-- blob), 2 refused (o_code: 1 unknown mailbox, 3 over quota).
CREATE OR REPLACE FUNCTION sp_blob_advance(p_id bytea, p_mb bytea, p_total bigint,
    p_exp bigint, p_from bigint, p_to bigint, p_complete boolean, p_hash bytea,
    p_src bytea, p_pct integer,
    OUT o_kind integer, OUT o_stored bigint, OUT o_code integer)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    u bigint;
    q bigint;
    s bigint;
BEGIN
    o_code := 0;
    SELECT mailbox, total_len, stored, complete INTO b FROM blobs WHERE id = p_id FOR UPDATE;
    IF FOUND THEN
        IF p_from IS NULL OR b.stored <> p_from OR b.complete OR b.mailbox <> p_mb
            OR b.total_len <> p_total THEN
            o_kind := 1;
            o_stored := b.stored;
            RETURN;
        END IF;
        UPDATE blobs SET stored = p_to, complete = p_complete, hash = p_hash WHERE id = p_id;
        o_kind := 0;
        RETURN;
    END IF;
    IF p_from IS NOT NULL THEN
        o_kind := 1;
        RETURN;
    END IF;
    -- A new blob: its whole length is charged now, under the mailbox's lock.
    SELECT used, quota INTO u, q FROM mailboxes WHERE id = p_mb FOR UPDATE;
    IF NOT FOUND THEN
        o_kind := 2;
        o_code := 1;
        RETURN;
    END IF;
    IF u + p_total > q THEN
        o_kind := 2;
        o_code := 3;
        RETURN;
    END IF;
    SELECT used INTO s FROM shares WHERE mailbox = p_mb AND source = p_src;
    IF COALESCE(s, 0) + p_total > sp_share(q, p_pct) THEN
        o_kind := 2;
        o_code := 3;
        RETURN;
    END IF;
    INSERT INTO blobs (id, mailbox, total_len, hash, expires_at, stored, complete, source)
        VALUES (p_id, p_mb, p_total, p_hash, p_exp, p_to, p_complete, p_src)
        ON CONFLICT (id) DO NOTHING;
    IF NOT FOUND THEN
        -- another node made it first
        SELECT stored INTO o_stored FROM blobs WHERE id = p_id;
        o_kind := 1;
        RETURN;
    END IF;
    UPDATE mailboxes SET used = used + p_total WHERE id = p_mb;
    PERFORM sp_charge_share(p_mb, p_src, p_total);
    o_kind := 0;
END $$;

CREATE OR REPLACE FUNCTION sp_blob_delete(p_id bytea, p_mb bytea)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    l bigint;
    src bytea;
BEGIN
    PERFORM 1 FROM mailboxes WHERE id = p_mb FOR UPDATE;
    DELETE FROM blobs WHERE id = p_id AND mailbox = p_mb RETURNING total_len, source
        INTO l, src;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE mailboxes SET used = GREATEST(0, used - l) WHERE id = p_mb;
    PERFORM sp_release_share(p_mb, src, l);
    RETURN true;
END $$;

-- Deletes expired items and blobs, a mailbox at a time in id order; the
-- ids of the blobs whose bytes are to be removed. One node sweeps at a
-- time (the others skip: nothing is left for them).
CREATE OR REPLACE FUNCTION sp_sweep(p_now bigint, OUT o_n bigint, OUT o_blobs bytea[])
LANGUAGE plpgsql AS $$
DECLARE
    m record;
    r record;
    freed bigint;
BEGIN
    o_n := 0;
    o_blobs := '{}';
    IF NOT pg_try_advisory_xact_lock(7465001) THEN
        RETURN;
    END IF;
    FOR m IN SELECT mb FROM (
            SELECT DISTINCT mailbox AS mb FROM items WHERE expires_at <= p_now
            UNION SELECT DISTINCT mailbox FROM blobs WHERE expires_at <= p_now) x
        ORDER BY mb
    LOOP
        PERFORM 1 FROM mailboxes WHERE id = m.mb FOR UPDATE;
        freed := 0;
        FOR r IN DELETE FROM items WHERE mailbox = m.mb AND expires_at <= p_now
            RETURNING length(payload) AS l, source
        LOOP
            o_n := o_n + 1;
            freed := freed + r.l;
            PERFORM sp_release_share(m.mb, r.source, r.l);
        END LOOP;
        FOR r IN DELETE FROM blobs WHERE mailbox = m.mb AND expires_at <= p_now
            RETURNING id, total_len AS l, source
        LOOP
            o_n := o_n + 1;
            freed := freed + r.l;
            o_blobs := o_blobs || r.id;
            PERFORM sp_release_share(m.mb, r.source, r.l);
        END LOOP;
        UPDATE mailboxes SET used = GREATEST(0, used - freed) WHERE id = m.mb;
    END LOOP;
END $$;

-- o_kind: 0 queued (o_id), 2 refused (o_code: 1 unknown, 2 expired, 3 over quota).
CREATE OR REPLACE FUNCTION sp_forward_enqueue(p_origin bytea, p_addr text, p_pin bytea,
    p_hops integer, p_mb bytea, p_now bigint, p_exp bigint, p_hash bytea, p_payload bytea,
    p_blob bytea, p_blob_len bigint,
    OUT o_kind integer, OUT o_id bigint, OUT o_code integer)
LANGUAGE plpgsql AS $$
DECLARE
    u bigint;
    q bigint;
    found_mb boolean;
    e bigint;
    len bigint := length(p_payload);
BEGIN
    o_kind := 0;
    o_id := 0;
    o_code := 0;
    SELECT used, quota INTO u, q FROM mailboxes WHERE id = p_origin FOR UPDATE;
    found_mb := FOUND;
    IF p_blob IS NOT NULL THEN
        SELECT id INTO e FROM forwards WHERE blob = p_blob AND mailbox = p_mb;
    ELSE
        SELECT id INTO e FROM forwards
            WHERE origin = p_origin AND hash = p_hash AND mailbox = p_mb AND blob IS NULL
            ORDER BY id LIMIT 1;
    END IF;
    IF e IS NOT NULL THEN
        o_id := e;
        RETURN;
    END IF;
    IF NOT found_mb THEN
        o_kind := 2;
        o_code := 1;
        RETURN;
    END IF;
    IF p_exp <= p_now THEN
        o_kind := 2;
        o_code := 2;
        RETURN;
    END IF;
    IF u + len > q THEN
        o_kind := 2;
        o_code := 3;
        RETURN;
    END IF;
    INSERT INTO forwards (origin, next_addr, next_pin, hops, mailbox, received_at, expires_at,
            hash, payload, next_at, blob, blob_len)
        VALUES (p_origin, p_addr, p_pin, p_hops, p_mb, p_now, p_exp, p_hash, p_payload, p_now,
            p_blob, p_blob_len)
        ON CONFLICT (blob, mailbox) WHERE blob IS NOT NULL DO NOTHING
        RETURNING id INTO o_id;
    IF o_id IS NULL THEN
        SELECT id INTO o_id FROM forwards WHERE blob = p_blob AND mailbox = p_mb;
        RETURN;
    END IF;
    UPDATE mailboxes SET used = used + len WHERE id = p_origin;
END $$;

-- Deletes forward entry p_id, giving its bytes back to its origin; the
-- origin (NULL: it was gone). The origin's row is locked first.
CREATE OR REPLACE FUNCTION sp_release_forward(p_id bigint)
RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
    o bytea;
    l bigint;
BEGIN
    SELECT origin INTO o FROM forwards WHERE id = p_id;
    IF o IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM mailboxes WHERE id = o FOR UPDATE;
    DELETE FROM forwards WHERE id = p_id RETURNING length(payload) INTO l;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE mailboxes SET used = GREATEST(0, used - l) WHERE id = o;
    RETURN o;
END $$;

-- o_gone: it was gone; else o_seq the notice's seq (NULL: none stored). A
-- notice is stored only for the origin, whatever its quota, in no share.
CREATE OR REPLACE FUNCTION sp_forward_end(p_id bigint, p_n_mb bytea, p_n_item_id bytea,
    p_n_now bigint, p_n_exp bigint, p_n_hash bytea, p_n_payload bytea,
    OUT o_gone boolean, OUT o_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    o bytea;
BEGIN
    o := sp_release_forward(p_id);
    o_gone := o IS NULL;
    IF NOT o_gone AND p_n_mb IS NOT NULL AND p_n_mb = o THEN
        o_seq := sp_store_item(o, p_n_item_id, p_n_now, p_n_exp, p_n_hash, p_n_payload, NULL);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION sp_forward_handed(p_id bigint, p_until bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO handed (id, origin, next_addr, next_pin, mailbox, hash, blob, until)
        SELECT id, origin, next_addr, next_pin, mailbox, hash, blob, p_until
        FROM forwards WHERE id = p_id
        ON CONFLICT (id) DO UPDATE SET origin = excluded.origin,
            next_addr = excluded.next_addr, next_pin = excluded.next_pin,
            mailbox = excluded.mailbox, hash = excluded.hash, blob = excluded.blob,
            until = excluded.until;
    RETURN sp_release_forward(p_id) IS NULL;
END $$;

CREATE OR REPLACE FUNCTION sp_handed_end(p_id bigint, p_n_mb bytea, p_n_item_id bytea,
    p_n_now bigint, p_n_exp bigint, p_n_hash bytea, p_n_payload bytea,
    OUT o_gone boolean, OUT o_seq bigint)
LANGUAGE plpgsql AS $$
DECLARE
    o bytea;
BEGIN
    DELETE FROM handed WHERE id = p_id RETURNING origin INTO o;
    o_gone := o IS NULL;
    IF NOT o_gone AND p_n_mb IS NOT NULL AND p_n_mb = o THEN
        PERFORM 1 FROM mailboxes WHERE id = o FOR UPDATE;
        o_seq := sp_store_item(o, p_n_item_id, p_n_now, p_n_exp, p_n_hash, p_n_payload, NULL);
    END IF;
END $$;

-- Submissions arriving together, in one transaction and one commit (group
-- commit). Mailboxes are taken in
-- ascending id order (so batches on several nodes never deadlock), each
-- locked and read once, its items decided in the order given, then written
-- together (one UPDATE of the mailbox, one INSERT of its items, one upsert
-- per source's share): a mailbox's row is not rewritten per item. The
-- outcomes (0 stored, 1 unknown mailbox, 2 expired, 3 over quota) and seqs
-- come back in the order given; a lone submission is a batch of one.
CREATE OR REPLACE FUNCTION sp_submit_many(p_mb bytea[], p_item_id bytea[], p_now bigint[],
    p_exp bigint[], p_hash bytea[], p_payload bytea[], p_src bytea[], p_pct integer,
    OUT o_outcome integer[], OUT o_seq bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    n integer := COALESCE(array_length(p_mb, 1), 0);
    i integer;
    k integer;
    cur bytea := NULL;
    found_mb boolean := false;
    u bigint;
    q bigint;
    lim bigint;
    last bigint;
    len bigint;
    s bigint;
    srcs bytea[];
    sused bigint[];
    sadd bigint[];
    acc_i integer[];
    acc_seq bigint[];
BEGIN
    o_outcome := array_fill(0, ARRAY[n]);
    o_seq := array_fill(0::bigint, ARRAY[n]);
    -- every index in mailbox order, then a NULL to write the last group
    FOR i IN SELECT x FROM (
            SELECT x FROM generate_subscripts(p_mb, 1) AS g(x)
            UNION ALL SELECT NULL) t
        ORDER BY (x IS NULL), p_mb[x], x
    LOOP
        IF i IS NULL OR cur IS DISTINCT FROM p_mb[i] THEN
            IF found_mb AND COALESCE(array_length(acc_i, 1), 0) > 0 THEN
                UPDATE mailboxes SET used = u, last_seq = last WHERE id = cur;
                INSERT INTO items (mailbox, seq, item_id, received_at, expires_at, hash,
                        payload, source)
                    SELECT cur, t.sq, p_item_id[t.k], p_now[t.k], p_exp[t.k], p_hash[t.k],
                        p_payload[t.k], p_src[t.k]
                    FROM unnest(acc_i, acc_seq) AS t(k, sq);
                INSERT INTO shares (mailbox, source, used)
                    SELECT cur, t.src, t.a FROM unnest(srcs, sadd) AS t(src, a) WHERE t.a > 0
                    ON CONFLICT (mailbox, source) DO UPDATE SET used = shares.used + excluded.used;
            END IF;
            EXIT WHEN i IS NULL;
            cur := p_mb[i];
            SELECT used, quota, last_seq INTO u, q, last FROM mailboxes WHERE id = cur FOR UPDATE;
            found_mb := FOUND;
            lim := sp_share(q, p_pct);
            srcs := '{}';
            sused := '{}';
            sadd := '{}';
            acc_i := '{}';
            acc_seq := '{}';
        END IF;
        IF NOT found_mb THEN
            o_outcome[i] := 1;
        ELSIF p_exp[i] <= p_now[i] THEN
            o_outcome[i] := 2;
        ELSE
            len := length(p_payload[i]);
            k := array_position(srcs, p_src[i]);
            IF k IS NULL THEN
                SELECT used INTO s FROM shares WHERE mailbox = cur AND source = p_src[i];
                srcs := srcs || p_src[i];
                sused := sused || COALESCE(s, 0);
                sadd := sadd || 0::bigint;
                k := array_length(srcs, 1);
            END IF;
            IF u + len > q OR sused[k] + len > lim THEN
                o_outcome[i] := 3;
            ELSE
                last := last + 1;
                u := u + len;
                sused[k] := sused[k] + len;
                sadd[k] := sadd[k] + len;
                acc_i := acc_i || i;
                acc_seq := acc_seq || last;
                o_seq[i] := last;
            END IF;
        END IF;
    END LOOP;
END $$;
