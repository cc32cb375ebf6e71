-- Consistency check after a row: the reservations, their outbox events and
-- the issuers' reserved totals must agree. Prints: reservations|ok
SELECT (SELECT count(*) FROM reservations)
       || '|' ||
       ((SELECT count(*) FROM reservations) = (SELECT count(*) FROM outbox)
        AND (SELECT coalesce(sum(amount), 0) FROM reservations)
            = (SELECT coalesce(sum(reserved), 0) FROM issuers))::text;
