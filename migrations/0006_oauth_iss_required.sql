-- RFC 9207: an authorization server whose metadata says authorization_response_iss_parameter_supported
-- puts `iss` in every authorization response, so a callback without it is refused. The promise is
-- remembered with the pending state, since the callback never rediscovers. States created before this
-- migration keep the old rule (iss checked only when present); they expire within ten minutes.

ALTER TABLE oauth_states
  ADD COLUMN iss_required boolean NOT NULL DEFAULT false;

-- The single-use trigger of 0002 and 0005, now comparing whole rows: every column but consumed_at stays
-- as inserted, including any a later migration adds.
CREATE OR REPLACE FUNCTION oauth_states_single_use() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.consumed_at IS NOT NULL THEN
    RAISE EXCEPTION 'oauth state already consumed' USING ERRCODE = 'check_violation';
  END IF;
  IF to_jsonb(NEW) - 'consumed_at' IS DISTINCT FROM to_jsonb(OLD) - 'consumed_at' THEN
    RAISE EXCEPTION 'oauth state is immutable except for consumed_at' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
