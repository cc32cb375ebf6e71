-- Run between benchmark rows so every row starts from the same state:
-- empty reservations/outbox, nothing reserved, fresh statistics, and a
-- checkpoint now rather than during the next measurement.
TRUNCATE reservations, outbox RESTART IDENTITY;
UPDATE issuers SET reserved = 0;
VACUUM ANALYZE issuers;
VACUUM ANALYZE reservations;
VACUUM ANALYZE outbox;
CHECKPOINT;
