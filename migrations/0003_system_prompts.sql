-- System prompts in three scopes: global (the platform's, org_id NULL), org (admins) and user.
-- Composition merges global -> org -> user by priority; `version` moves on every change so a composed
-- prompt can be cached by the versions it was built from.

CREATE TABLE system_prompts (
  id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  scope        text NOT NULL CHECK (scope IN ('global', 'org', 'user')),
  org_id       text REFERENCES organizations (id) ON DELETE CASCADE,
  user_id      text CHECK (length(user_id) BETWEEN 1 AND 255),
  name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  content      text NOT NULL CHECK (length(content) <= 100000),
  priority     integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
  is_template  boolean NOT NULL DEFAULT false,
  enabled      boolean NOT NULL DEFAULT true,
  version      integer NOT NULL DEFAULT 1,
  created_by   text,
  created_at   timestamptz NOT NULL DEFAULT now(),
  updated_at   timestamptz NOT NULL DEFAULT now(),
  CHECK (CASE scope
           WHEN 'global' THEN org_id IS NULL AND user_id IS NULL
           WHEN 'org' THEN org_id IS NOT NULL AND user_id IS NULL
           ELSE org_id IS NOT NULL AND user_id IS NOT NULL
         END)
);
CREATE INDEX system_prompts_org_idx ON system_prompts (org_id, scope, user_id, priority);

CREATE TRIGGER system_prompts_bump_version BEFORE UPDATE ON system_prompts
  FOR EACH ROW EXECUTE FUNCTION bump_version();

ALTER TABLE system_prompts ENABLE ROW LEVEL SECURITY;
ALTER TABLE system_prompts FORCE ROW LEVEL SECURITY;

-- Global prompts are readable in any tenant (or platform) context, never without one; they are
-- written only in the platform context. Org and user prompts belong to their org.
CREATE POLICY system_prompts_read ON system_prompts FOR SELECT
  USING (org_id = app_current_org()
         OR (org_id IS NULL AND (app_current_org() IS NOT NULL OR app_is_platform())));
CREATE POLICY system_prompts_insert ON system_prompts FOR INSERT
  WITH CHECK (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()));
CREATE POLICY system_prompts_update ON system_prompts FOR UPDATE
  USING (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()))
  WITH CHECK (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()));
CREATE POLICY system_prompts_delete ON system_prompts FOR DELETE
  USING (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()));

GRANT SELECT, INSERT, UPDATE, DELETE ON system_prompts TO agentbox_app;
REVOKE TRUNCATE ON system_prompts FROM agentbox_app;
