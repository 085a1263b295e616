-- Money and host figures within the bounds the controller now enforces
-- (gantry_proto::api::v1::MAX_CREDIT_MICROS = 2^53,
-- gantry_proto::api::agent::MAX_STORE_BYTES = 2^50 and MAX_SNAPSHOT_BYTES =
-- 2^46). Before them a balance could overflow 64 bits (SQLite then stores
-- a REAL, which no reader accepts) and a host could report any size: such
-- values are clamped to the bounds once, here.
UPDATE accounts SET credit_micros = CASE
    WHEN credit_micros > 9007199254740992 THEN 9007199254740992
    WHEN credit_micros < -9007199254740992 THEN -9007199254740992
    ELSE CAST(credit_micros AS INTEGER) END
WHERE typeof(credit_micros) <> 'integer' OR credit_micros > 9007199254740992
    OR credit_micros < -9007199254740992;
UPDATE host_store_usage SET billed_bytes = 1125899906842624
WHERE billed_bytes > 1125899906842624;
UPDATE snapshots SET logical_bytes = 70368744177664 WHERE logical_bytes > 70368744177664;
UPDATE snapshots SET compressed_bytes = 70368744177664
WHERE compressed_bytes > 70368744177664;
