-- Model provider API keys, per org (admins set them) and per user (a user's own wins over the org's).
-- key_enc holds AES-256-GCM ciphertext from agentbox.api.crypto (`v1:<key id>:<data>`), bound by its
-- associated data to (org, table, row id, column, key id): never plaintext. The API renders each key into
-- a Secret of the org's tenant namespace that sessions reference (spec.egress.providerKey); only the
-- session's egress proxy mounts it.

CREATE TABLE provider_keys (
  id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  org_id      text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  user_id     text CHECK (length(user_id) BETWEEN 1 AND 255),  -- NULL: the org's key
  provider    text NOT NULL CHECK (provider IN ('anthropic', 'gemini', 'openai')),
  key_enc     text NOT NULL CHECK (key_enc LIKE 'v1:%'),
  created_by  text,
  created_at  timestamptz NOT NULL DEFAULT now(),
  updated_at  timestamptz NOT NULL DEFAULT now(),
  version     integer NOT NULL DEFAULT 1,
  UNIQUE NULLS NOT DISTINCT (org_id, user_id, provider)
);

CREATE TRIGGER provider_keys_bump_version BEFORE UPDATE ON provider_keys
  FOR EACH ROW EXECUTE FUNCTION bump_version();

ALTER TABLE provider_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE provider_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY provider_keys_tenant ON provider_keys FOR ALL
  USING (org_id = app_current_org()) WITH CHECK (org_id = app_current_org());

GRANT SELECT, INSERT, UPDATE, DELETE ON provider_keys TO agentbox_app;
REVOKE TRUNCATE ON provider_keys FROM agentbox_app;
