-- Tenancy: organizations, users, memberships, and the functions every row-level policy uses.
--
-- Roles (created by agentbox.api.migrate.provision, or by the platform's own tooling):
--   * the owner runs these migrations and owns every object;
--   * agentbox_app is what the API connects as: LOGIN, not owner, not superuser, NOBYPASSRLS.
-- Tenant context is per transaction: set_config('app.current_org', <org id>, true). The platform
-- context (the service role) is set_config('app.platform', 'on', true). With neither, every tenant
-- table reads as empty.

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'agentbox_app') THEN
    RAISE EXCEPTION 'role agentbox_app does not exist: create it first (agentbox.api.migrate.provision)';
  END IF;
END $$;

-- The org of the current transaction, NULL when none is set (an unset custom setting reads as ''
-- once any transaction in the session has set it, hence NULLIF).
CREATE FUNCTION app_current_org() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  AS $$ SELECT NULLIF(pg_catalog.current_setting('app.current_org', true), '') $$;

CREATE FUNCTION app_is_platform() RETURNS boolean
  LANGUAGE sql STABLE PARALLEL SAFE
  AS $$ SELECT COALESCE(pg_catalog.current_setting('app.platform', true), '') = 'on' $$;

-- Org ids become namespace names (`tenant-<id>`), so they are DNS labels short enough for the prefix.
CREATE TABLE organizations (
  id          text PRIMARY KEY
              CHECK (id ~ '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' AND length(id) <= 56),
  name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  created_at  timestamptz NOT NULL DEFAULT now()
);

-- A user is the JWT `sub`; the same person may belong to several orgs through memberships.
CREATE TABLE users (
  id            text PRIMARY KEY CHECK (length(id) BETWEEN 1 AND 255),
  email         text CHECK (length(email) <= 320),
  display_name  text CHECK (length(display_name) <= 200),
  created_at    timestamptz NOT NULL DEFAULT now(),
  last_seen_at  timestamptz
);

CREATE TABLE memberships (
  org_id      text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
  user_id     text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
  role        text NOT NULL CHECK (role IN ('admin', 'user')),
  created_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, user_id)
);
CREATE INDEX memberships_user_idx ON memberships (user_id);

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
ALTER TABLE organizations FORCE ROW LEVEL SECURITY;
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
ALTER TABLE users FORCE ROW LEVEL SECURITY;
ALTER TABLE memberships ENABLE ROW LEVEL SECURITY;
ALTER TABLE memberships FORCE ROW LEVEL SECURITY;

-- A tenant sees its own org row; only the platform creates, renames or deletes orgs (and lists them).
CREATE POLICY organizations_read ON organizations FOR SELECT
  USING (id = app_current_org() OR app_is_platform());
CREATE POLICY organizations_platform_write ON organizations FOR ALL
  USING (app_is_platform()) WITH CHECK (app_is_platform());

CREATE POLICY memberships_tenant ON memberships FOR ALL
  USING (org_id = app_current_org()) WITH CHECK (org_id = app_current_org());

-- Users are visible to an org only through its memberships (the subquery is itself row-filtered).
-- Any tenant may register a user row (first login); changing one needs a membership in the org.
CREATE POLICY users_read ON users FOR SELECT
  USING (app_is_platform() OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = users.id));
CREATE POLICY users_register ON users FOR INSERT
  WITH CHECK (app_current_org() IS NOT NULL OR app_is_platform());
CREATE POLICY users_update ON users FOR UPDATE
  USING (app_is_platform() OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = users.id))
  WITH CHECK (app_is_platform() OR EXISTS (SELECT 1 FROM memberships m WHERE m.user_id = users.id));
CREATE POLICY users_platform_delete ON users FOR DELETE USING (app_is_platform());

GRANT SELECT, INSERT, UPDATE, DELETE ON organizations, users, memberships TO agentbox_app;
-- Row security does not cover TRUNCATE: make sure the app never holds it.
REVOKE TRUNCATE ON organizations, users, memberships FROM agentbox_app;
GRANT EXECUTE ON FUNCTION app_current_org(), app_is_platform() TO agentbox_app;
