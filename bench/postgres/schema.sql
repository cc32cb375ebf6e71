-- Schema for the PostgreSQL side of the Harbor benchmark.
-- Loaded into a fresh database by run.sh; safe to re-run.

DROP FUNCTION IF EXISTS reserve(text, bigint, text, text, text);
DROP TABLE IF EXISTS outbox, reservations, issuers;

-- One row per issuer: its limit and how much of it is reserved.
-- fillfactor 50 leaves room on each page so the constant
-- "reserved = reserved + x" updates stay HOT (no index update per commit),
-- which is how a DBA would set up a hot counter table.
CREATE TABLE issuers (
    issuer_id    text PRIMARY KEY,
    limit_amount bigint NOT NULL,
    reserved     bigint NOT NULL DEFAULT 0
) WITH (fillfactor = 50);

CREATE TABLE reservations (
    reservation_id bigserial PRIMARY KEY,
    token          text UNIQUE NOT NULL,   -- the client's idempotency token
    issuer_id      text NOT NULL,
    amount         bigint,
    desk           text,
    trader         text,
    created_at     timestamptz DEFAULT now()
);

-- Transactional outbox: the event a downstream consumer would publish.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    reservation_id bigint,
    payload        jsonb
);

-- The whole reservation as one server-side call (the "function" mode):
-- lock the issuer, check headroom, insert the reservation and its outbox
-- event, bump the issuer's reserved amount. Returns the new reservation id,
-- or NULL when the reservation would exceed the limit (nothing is written).
CREATE FUNCTION reserve(p_issuer text, p_amount bigint, p_token text,
                        p_desk text, p_trader text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_limit    bigint;
    v_reserved bigint;
    v_id       bigint;
BEGIN
    SELECT limit_amount, reserved INTO v_limit, v_reserved
      FROM issuers WHERE issuer_id = p_issuer FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown issuer %', p_issuer;
    END IF;
    IF v_reserved + p_amount > v_limit THEN
        RETURN NULL;                         -- rejected: no headroom
    END IF;

    INSERT INTO reservations (token, issuer_id, amount, desk, trader)
    VALUES (p_token, p_issuer, p_amount, p_desk, p_trader)
    RETURNING reservation_id INTO v_id;

    INSERT INTO outbox (reservation_id, payload)
    VALUES (v_id, jsonb_build_object('reservation_id', v_id, 'token', p_token,
                                     'issuer_id', p_issuer, 'amount', p_amount));

    UPDATE issuers SET reserved = reserved + p_amount WHERE issuer_id = p_issuer;
    RETURN v_id;
END
$$;
