-- Gantry controller schema, version 15 (issue 14): API tokens can expire.
-- Same conventions as version 1.

-- When the token stops working (Unix ms, the controller's clock); NULL:
-- never. Past it the token answers 401 "token ... has expired".
ALTER TABLE tokens ADD COLUMN expires_ms INTEGER;
