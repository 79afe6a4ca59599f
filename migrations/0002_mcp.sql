-- MCP server configurations, their OAuth tokens, and pending OAuth authorisations.
-- Every credential column holds AES-256-GCM ciphertext from agentbox.api.crypto (`v1:<key id>:<data>`),
-- bound by its associated data to (org, table, row id, column, key id): never plaintext.

CREATE TABLE mcp_configurations (
  id                 uuid NOT NULL DEFAULT gen_random_uuid(),
  org_id             text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  name               text NOT NULL CHECK (name ~ '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' AND length(name) <= 63),
  description        text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
  transport          text NOT NULL CHECK (transport IN ('streamable-http', 'sse', 'stdio')),
  url                text CHECK (length(url) <= 2048),
  stdio_command      text CHECK (length(stdio_command) <= 1024),
  stdio_args         jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(stdio_args) = 'array'),
  auth_type          text NOT NULL DEFAULT 'none' CHECK (auth_type IN ('none', 'bearer', 'oauth')),
  -- encrypted: the bearer token; a JSON object of secret header values; a JSON object of stdio env
  bearer_token_enc   text CHECK (bearer_token_enc LIKE 'v1:%'),
  secret_headers_enc text CHECK (secret_headers_enc LIKE 'v1:%'),
  stdio_env_enc      text CHECK (stdio_env_enc LIKE 'v1:%'),
  -- plain header values that are not secret: [{"name": ..., "value": ...}]
  headers            jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(headers) = 'array'),
  tools_allow        text[] NOT NULL DEFAULT '{}',
  tools_deny         text[] NOT NULL DEFAULT '{}',
  timeout_seconds    integer NOT NULL DEFAULT 30 CHECK (timeout_seconds BETWEEN 1 AND 600),
  status             text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'ready', 'unreachable', 'invalid', 'needs-reauth')),
  status_message     text CHECK (length(status_message) <= 2000),
  created_by         text,
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  version            integer NOT NULL DEFAULT 1,
  PRIMARY KEY (id),
  UNIQUE (org_id, id),
  UNIQUE (org_id, name),
  CHECK ((transport = 'stdio') = (stdio_command IS NOT NULL)),
  CHECK ((transport = 'stdio') = (url IS NULL)),
  CHECK (auth_type <> 'bearer' OR bearer_token_enc IS NOT NULL)
);

-- One row per configuration using OAuth. Same org as its configuration by construction (composite key).
CREATE TABLE mcp_oauth_tokens (
  configuration_id   uuid PRIMARY KEY,
  org_id             text NOT NULL,
  issuer             text NOT NULL,
  resource           text NOT NULL,
  client_id          text NOT NULL,
  client_secret_enc  text CHECK (client_secret_enc LIKE 'v1:%'),
  access_token_enc   text NOT NULL CHECK (access_token_enc LIKE 'v1:%'),
  refresh_token_enc  text CHECK (refresh_token_enc LIKE 'v1:%'),
  token_type         text NOT NULL DEFAULT 'Bearer',
  scope              text,
  expires_at         timestamptz,
  created_at         timestamptz NOT NULL DEFAULT now(),
  updated_at         timestamptz NOT NULL DEFAULT now(),
  FOREIGN KEY (org_id, configuration_id) REFERENCES mcp_configurations (org_id, id) ON DELETE CASCADE
);

-- A pending authorisation. The state itself is never stored, only its SHA-256; it is single use
-- (consumed_at, set once), expires after 10 minutes, and is bound to user, org, verifier and issuer.
CREATE TABLE oauth_states (
  state_hash         bytea PRIMARY KEY CHECK (length(state_hash) = 32),
  org_id             text NOT NULL,
  user_id            text NOT NULL,
  configuration_id   uuid NOT NULL,
  issuer             text NOT NULL,
  resource           text NOT NULL,
  redirect_uri       text NOT NULL,
  code_verifier_enc  text NOT NULL CHECK (code_verifier_enc LIKE 'v1:%'),
  created_at         timestamptz NOT NULL DEFAULT now(),
  expires_at         timestamptz NOT NULL DEFAULT now() + interval '10 minutes',
  consumed_at        timestamptz,
  CHECK (expires_at > created_at AND expires_at <= created_at + interval '10 minutes'),
  FOREIGN KEY (org_id, configuration_id) REFERENCES mcp_configurations (org_id, id) ON DELETE CASCADE
);
CREATE INDEX oauth_states_expiry_idx ON oauth_states (expires_at);

-- A state may be consumed once and never revived or re-bound.
CREATE FUNCTION oauth_states_single_use() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.consumed_at IS NOT NULL THEN
    RAISE EXCEPTION 'oauth state already consumed' USING ERRCODE = 'check_violation';
  END IF;
  IF (NEW.state_hash, NEW.org_id, NEW.user_id, NEW.configuration_id, NEW.issuer, NEW.resource,
      NEW.redirect_uri, NEW.code_verifier_enc, NEW.created_at, NEW.expires_at)
     IS DISTINCT FROM
     (OLD.state_hash, OLD.org_id, OLD.user_id, OLD.configuration_id, OLD.issuer, OLD.resource,
      OLD.redirect_uri, OLD.code_verifier_enc, OLD.created_at, OLD.expires_at) THEN
    RAISE EXCEPTION 'oauth state is immutable except for consumed_at' USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER oauth_states_single_use BEFORE UPDATE ON oauth_states
  FOR EACH ROW EXECUTE FUNCTION oauth_states_single_use();

-- Consume a state atomically: the row comes back once, only if unexpired and unused; NULL otherwise.
CREATE FUNCTION oauth_consume_state(p_state_hash bytea) RETURNS oauth_states
  LANGUAGE sql VOLATILE
  AS $$
    UPDATE oauth_states SET consumed_at = now()
     WHERE state_hash = p_state_hash AND consumed_at IS NULL AND expires_at > now()
    RETURNING *
  $$;

-- Every update bumps the row's version (caches key on it) and its updated_at.
CREATE FUNCTION bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.version := OLD.version + 1;
  NEW.updated_at := now();
  RETURN NEW;
END $$;
CREATE TRIGGER mcp_configurations_bump_version BEFORE UPDATE ON mcp_configurations
  FOR EACH ROW EXECUTE FUNCTION bump_version();

ALTER TABLE mcp_configurations ENABLE ROW LEVEL SECURITY;
ALTER TABLE mcp_configurations FORCE ROW LEVEL SECURITY;
ALTER TABLE mcp_oauth_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE mcp_oauth_tokens FORCE ROW LEVEL SECURITY;
ALTER TABLE oauth_states ENABLE ROW LEVEL SECURITY;
ALTER TABLE oauth_states FORCE ROW LEVEL SECURITY;

CREATE POLICY mcp_configurations_tenant ON mcp_configurations FOR ALL
  USING (org_id = app_current_org()) WITH CHECK (org_id = app_current_org());
CREATE POLICY mcp_oauth_tokens_tenant ON mcp_oauth_tokens FOR ALL
  USING (org_id = app_current_org()) WITH CHECK (org_id = app_current_org());
CREATE POLICY oauth_states_tenant ON oauth_states FOR ALL
  USING (org_id = app_current_org()) WITH CHECK (org_id = app_current_org());

-- What lists and reads return: everything but the ciphertext. security_invoker makes the caller's
-- row security apply (a plain view would run with the owner's rights).
CREATE VIEW mcp_configuration_summaries WITH (security_invoker = true) AS
  SELECT id, org_id, name, description, transport, url, stdio_command, stdio_args, auth_type,
         bearer_token_enc IS NOT NULL AS has_bearer_token,
         secret_headers_enc IS NOT NULL AS has_secret_headers,
         stdio_env_enc IS NOT NULL AS has_stdio_env,
         headers, tools_allow, tools_deny, timeout_seconds, status, status_message,
         created_by, created_at, updated_at, version
    FROM mcp_configurations;

GRANT SELECT, INSERT, UPDATE, DELETE ON mcp_configurations, mcp_oauth_tokens, oauth_states TO agentbox_app;
REVOKE TRUNCATE ON mcp_configurations, mcp_oauth_tokens, oauth_states FROM agentbox_app;
GRANT SELECT ON mcp_configuration_summaries TO agentbox_app;
GRANT EXECUTE ON FUNCTION oauth_consume_state(bytea) TO agentbox_app;
