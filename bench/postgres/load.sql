-- N issuers ISS-0 .. ISS-{N-1}; run with  psql -v issuers=N -f load.sql
-- The limit is huge (10^18) so no reservation is ever rejected for headroom:
-- the benchmark measures the cost of the transaction, not of rejections.
TRUNCATE issuers;
INSERT INTO issuers (issuer_id, limit_amount, reserved)
SELECT 'ISS-' || i, 1000000000000000000, 0
  FROM generate_series(0, :issuers - 1) AS i;
VACUUM ANALYZE issuers;
