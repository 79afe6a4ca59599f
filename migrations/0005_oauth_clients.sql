-- OAuth for MCP servers: what the callback, refresh and revocation need beyond 0002.
-- A pending authorisation carries the client it was started with (pre-registered or dynamically
-- registered) and the endpoints discovered at init, so the callback talks to exactly the server the
-- user was sent to and never rediscovers. A connection keeps the same, plus who connected it.

-- Pending states live ten minutes: dropping them here costs a user at most one retry.
DELETE FROM oauth_states;

ALTER TABLE oauth_states
  ADD COLUMN client_id          text NOT NULL CHECK (length(client_id) BETWEEN 1 AND 512),
  ADD COLUMN client_secret_enc  text CHECK (client_secret_enc LIKE 'v1:%'),
  ADD COLUMN token_auth_method  text NOT NULL
             CHECK (token_auth_method IN ('none', 'client_secret_basic', 'client_secret_post')),
  ADD COLUMN token_endpoint     text NOT NULL CHECK (length(token_endpoint) <= 2048),
  ADD COLUMN revocation_endpoint text CHECK (length(revocation_endpoint) <= 2048),
  ADD COLUMN scope              text CHECK (length(scope) <= 2000);

ALTER TABLE mcp_oauth_tokens
  ADD COLUMN token_auth_method  text NOT NULL DEFAULT 'none'
             CHECK (token_auth_method IN ('none', 'client_secret_basic', 'client_secret_post')),
  ADD COLUMN token_endpoint     text NOT NULL DEFAULT '' CHECK (length(token_endpoint) <= 2048),
  ADD COLUMN revocation_endpoint text CHECK (length(revocation_endpoint) <= 2048),
  ADD COLUMN connected_by       text CHECK (length(connected_by) <= 255),
  -- Moves on every write: a refresh that waited for another one sees it moved and does not repeat it.
  ADD COLUMN version            integer NOT NULL DEFAULT 1;
CREATE INDEX mcp_oauth_tokens_expiry_idx ON mcp_oauth_tokens (expires_at);

CREATE FUNCTION mcp_oauth_tokens_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.version := OLD.version + 1;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER mcp_oauth_tokens_bump_version BEFORE UPDATE ON mcp_oauth_tokens
  FOR EACH ROW EXECUTE FUNCTION mcp_oauth_tokens_bump_version();

-- The single-use trigger of 0002 also keeps the new columns immutable.
CREATE OR REPLACE FUNCTION oauth_states_single_use() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.consumed_at IS NOT NULL THEN
    RAISE EXCEPTION 'oauth state already consumed' USING ERRCODE = 'check_violation';
  END IF;
  IF (NEW.state_hash, NEW.org_id, NEW.user_id, NEW.configuration_id, NEW.issuer, NEW.resource,
      NEW.redirect_uri, NEW.code_verifier_enc, NEW.created_at, NEW.expires_at, NEW.client_id,
      NEW.client_secret_enc, NEW.token_auth_method, NEW.token_endpoint, NEW.revocation_endpoint, NEW.scope)
     IS DISTINCT FROM
     (OLD.state_hash, OLD.org_id, OLD.user_id, OLD.configuration_id, OLD.issuer, OLD.resource,
      OLD.redirect_uri, OLD.code_verifier_enc, OLD.created_at, OLD.expires_at, OLD.client_id,
      OLD.client_secret_enc, OLD.token_auth_method, OLD.token_endpoint, OLD.revocation_endpoint, OLD.scope)
  THEN
    RAISE EXCEPTION 'oauth state is immutable except for consumed_at' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
