-- Money and host figures within the bounds the controller now enforces
-- (gantry_proto::api::v1::MAX_CREDIT_MICROS = 2^53,
-- gantry_proto::api::agent::MAX_STORE_BYTES = 2^50 and MAX_SNAPSHOT_BYTES =
-- 2^46): values stored before the bounds existed are clamped once, here.
UPDATE accounts SET credit_micros = 9007199254740992 WHERE credit_micros > 9007199254740992;
UPDATE accounts SET credit_micros = -9007199254740992 WHERE credit_micros < -9007199254740992;
UPDATE host_store_usage SET billed_bytes = 1125899906842624
WHERE billed_bytes > 1125899906842624;
UPDATE snapshots SET logical_bytes = 70368744177664 WHERE logical_bytes > 70368744177664;
UPDATE snapshots SET compressed_bytes = 70368744177664
WHERE compressed_bytes > 70368744177664;
