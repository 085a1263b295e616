-- Gantry controller schema, version 20 (issue 16): an index on the
-- instances' pending operation. Ending an operation clears
-- `pending_op = <its id>`; without the index that update scanned every
-- instance row ever created (released ones too) for each ended operation.
-- Same conventions as version 1.
CREATE INDEX instances_pending_op ON instances (pending_op);
