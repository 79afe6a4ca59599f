-- The audit log: append-only, hash-chained per org, partitioned by month.
--
-- Chain: each org's rows are numbered seq = 1, 2, ...; row n stores prev_hash = hash of row n-1 (32 zero
-- bytes for the first) and hash = sha256(prev_hash || audit_canonical(row)). Appends to one chain are
-- serialised by pg_advisory_xact_lock plus a row lock on the chain's head, so concurrent writers never
-- fork it. org_id NULL is the platform's own chain. The trigger computes everything; the app may
-- insert only the descriptive columns.
--
-- Append-only: the app holds no UPDATE, DELETE or TRUNCATE, and row and statement triggers refuse
-- them for everyone else too (the owner must disable the triggers on purpose to tamper).
--
-- Retention: audit_ensure_partitions() keeps monthly partitions ahead of time; an operator retires a
-- month with audit_retire_partition(), which records each chain's last retired (seq, hash) as its
-- anchor and detaches the partition for archiving; verification then starts from the anchor.

CREATE TABLE audit_logs (
  id          bigint GENERATED ALWAYS AS IDENTITY,
  org_id      text,
  seq         bigint NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now(),
  actor_sub   text CHECK (length(actor_sub) <= 255),
  actor_role  text CHECK (length(actor_role) <= 64),
  action      text NOT NULL CHECK (length(action) BETWEEN 1 AND 128),
  target      text CHECK (length(target) <= 512),
  outcome     text NOT NULL CHECK (outcome IN ('success', 'denied', 'failed')),
  reason      text CHECK (length(reason) <= 2000),
  ip          inet,
  user_agent  text CHECK (length(user_agent) <= 1024),
  request_id  text CHECK (length(request_id) <= 128),
  details     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object'),
  prev_hash   bytea NOT NULL CHECK (length(prev_hash) = 32),
  hash        bytea NOT NULL CHECK (length(hash) = 32),
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE INDEX audit_logs_chain_idx ON audit_logs (org_id, seq);
CREATE INDEX audit_logs_time_idx ON audit_logs (org_id, created_at);

-- The last (seq, hash) of every chain, and where a chain resumes after retention. Key '' is the
-- platform chain. The app has no access: only the SECURITY DEFINER functions below touch them.
CREATE TABLE audit_chain_heads (
  chain  text PRIMARY KEY,
  seq    bigint NOT NULL,
  hash   bytea NOT NULL
);
CREATE TABLE audit_chain_anchors (
  chain       text PRIMARY KEY,
  seq         bigint NOT NULL,
  hash        bytea NOT NULL,
  retired_at  timestamptz NOT NULL DEFAULT now()
);

-- The exact bytes a row's hash covers. Timestamps in UTC with microseconds, so the text never depends
-- on the session's TimeZone; jsonb's text form is deterministic.
CREATE FUNCTION audit_canonical(
    p_id bigint, p_org_id text, p_seq bigint, p_created_at timestamptz, p_actor_sub text,
    p_actor_role text, p_action text, p_target text, p_outcome text, p_reason text, p_ip inet,
    p_user_agent text, p_request_id text, p_details jsonb)
  RETURNS text LANGUAGE sql STABLE PARALLEL SAFE
  AS $$
    SELECT jsonb_build_array(
      p_id, p_org_id, p_seq,
      to_char(p_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
      p_actor_sub, p_actor_role, p_action, p_target, p_outcome, p_reason, p_ip::text,
      p_user_agent, p_request_id, p_details)::text
  $$;

CREATE FUNCTION audit_logs_chain() RETURNS trigger
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
  AS $$
DECLARE
  chain_key text := COALESCE(NEW.org_id, '');
  head audit_chain_heads%ROWTYPE;
BEGIN
  -- 1096107092 = 'AUDT': the advisory-lock class of audit chains.
  PERFORM pg_advisory_xact_lock(1096107092, hashtext(chain_key));
  SELECT * INTO head FROM audit_chain_heads WHERE chain = chain_key FOR UPDATE;
  IF FOUND THEN
    NEW.seq := head.seq + 1;
    NEW.prev_hash := head.hash;
  ELSE
    NEW.seq := 1;
    NEW.prev_hash := '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea;
  END IF;
  NEW.hash := sha256(NEW.prev_hash || convert_to(audit_canonical(
    NEW.id, NEW.org_id, NEW.seq, NEW.created_at, NEW.actor_sub, NEW.actor_role, NEW.action, NEW.target,
    NEW.outcome, NEW.reason, NEW.ip, NEW.user_agent, NEW.request_id, NEW.details), 'UTF8'));
  INSERT INTO audit_chain_heads AS h (chain, seq, hash) VALUES (chain_key, NEW.seq, NEW.hash)
    ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash;
  RETURN NEW;
END $$;
CREATE TRIGGER audit_logs_chain BEFORE INSERT ON audit_logs
  FOR EACH ROW EXECUTE FUNCTION audit_logs_chain();

CREATE FUNCTION audit_logs_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_logs is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER audit_logs_append_only BEFORE UPDATE OR DELETE ON audit_logs
  FOR EACH ROW EXECUTE FUNCTION audit_logs_refuse_change();
-- Row security hides every row from UPDATE and DELETE (no policy allows them), so the row trigger
-- would never see one: the statement trigger refuses the attempt itself, TRUNCATE included.
CREATE TRIGGER audit_logs_refuse_statement BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_logs
  FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change();

-- Creates the partitions from this month to months_ahead months on (idempotent). Statement triggers
-- are not inherited, so each partition gets its own guard.
CREATE FUNCTION audit_ensure_partitions(months_ahead integer DEFAULT 3) RETURNS void
  LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
  AS $$
DECLARE
  month_start timestamp := date_trunc('month', now() AT TIME ZONE 'UTC');
  partition_name text;
BEGIN
  FOR i IN 0 .. months_ahead LOOP
    partition_name := 'audit_logs_' || to_char(month_start + make_interval(months => i), 'YYYY_MM');
    EXECUTE format(
      'CREATE TABLE IF NOT EXISTS public.%I PARTITION OF public.audit_logs FOR VALUES FROM (%L) TO (%L)',
      partition_name,
      (month_start + make_interval(months => i)) AT TIME ZONE 'UTC',
      (month_start + make_interval(months => i + 1)) AT TIME ZONE 'UTC');
    EXECUTE format(
      'CREATE OR REPLACE TRIGGER audit_logs_refuse_statement BEFORE UPDATE OR DELETE OR TRUNCATE ON public.%I '
      'FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change()', partition_name);
  END LOOP;
END $$;

-- A catch-all so an insert never fails for want of a partition (keep audit_ensure_partitions ahead).
CREATE TABLE audit_logs_default PARTITION OF audit_logs DEFAULT;
CREATE TRIGGER audit_logs_refuse_statement BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_logs_default
  FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change();
SELECT audit_ensure_partitions(3);

-- Retention (an operator's act, run as the owner): detach one month's partition for archiving, after
-- recording where each chain in it ends so verification can resume from there. Only a month that has
-- ended can go (a current one would send new rows to the default partition).
CREATE FUNCTION audit_retire_partition(partition_name text) RETURNS void
  LANGUAGE plpgsql SET search_path = pg_catalog, public
  AS $$
DECLARE
  bound text;
BEGIN
  SELECT pg_get_expr(c.relpartbound, c.oid) INTO bound
    FROM pg_class c JOIN pg_inherits i ON i.inhrelid = c.oid
   WHERE i.inhparent = 'public.audit_logs'::regclass AND c.relname = partition_name;
  IF bound IS NULL THEN
    RAISE EXCEPTION '% is not a partition of audit_logs', partition_name;
  END IF;
  IF bound = 'DEFAULT' OR substring(bound FROM 'TO \(''([^'']+)''\)')::timestamptz > now() THEN
    RAISE EXCEPTION 'partition % has not ended yet (%): only past months can be retired', partition_name, bound;
  END IF;
  EXECUTE format(
    'INSERT INTO audit_chain_anchors AS a (chain, seq, hash)
       SELECT DISTINCT ON (COALESCE(org_id, %L)) COALESCE(org_id, %L), seq, hash
         FROM %I ORDER BY COALESCE(org_id, %L), seq DESC
     ON CONFLICT (chain) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, retired_at = now()
       WHERE excluded.seq > a.seq', '', '', partition_name, '');
  EXECUTE format('ALTER TABLE audit_logs DETACH PARTITION %I', partition_name);
END $$;
REVOKE EXECUTE ON FUNCTION audit_retire_partition(text) FROM PUBLIC;

-- The current context's chain state for the verifier: where it resumes and where it ends.
CREATE FUNCTION audit_chain_state(
    OUT anchor_seq bigint, OUT anchor_hash bytea, OUT head_seq bigint, OUT head_hash bytea)
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
  AS $$
    SELECT a.seq, a.hash, h.seq, h.hash
      FROM (SELECT CASE WHEN app_current_org() IS NOT NULL THEN app_current_org()
                        WHEN app_is_platform() THEN '' END AS chain) c
      LEFT JOIN audit_chain_anchors a ON a.chain = c.chain
      LEFT JOIN audit_chain_heads h ON h.chain = c.chain
     WHERE c.chain IS NOT NULL
  $$;
REVOKE EXECUTE ON FUNCTION audit_chain_state() FROM PUBLIC;

-- The one way the API appends (SECURITY INVOKER: the caller's privileges and row security apply).
-- With p_own_transaction it first sets the context for p_org_id (the platform's when NULL), so a caller
-- outside any transaction appends in a single round trip: the chain lock is then held only for the
-- server's own work, never across the network. Inside a caller's transaction it leaves the context
-- alone, and row security refuses an org other than the one already set.
CREATE FUNCTION audit_append(
    p_own_transaction boolean, p_org_id text, p_actor_sub text, p_actor_role text, p_action text,
    p_target text, p_outcome text, p_reason text, p_ip inet, p_user_agent text, p_request_id text,
    p_details jsonb,
    OUT id bigint, OUT seq bigint, OUT created_at timestamptz, OUT hash bytea)
  LANGUAGE plpgsql
  AS $$
BEGIN
  IF p_own_transaction THEN
    PERFORM set_config('app.current_org', COALESCE(p_org_id, ''), true);
    PERFORM set_config('app.platform', CASE WHEN p_org_id IS NULL THEN 'on' ELSE '' END, true);
  END IF;
  INSERT INTO audit_logs AS a (org_id, actor_sub, actor_role, action, target, outcome, reason, ip,
                               user_agent, request_id, details)
  VALUES (p_org_id, p_actor_sub, p_actor_role, p_action, p_target, p_outcome, p_reason, p_ip,
          p_user_agent, p_request_id, p_details)
  RETURNING a.id, a.seq, a.created_at, a.hash INTO id, seq, created_at, hash;
END $$;

ALTER TABLE audit_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY audit_logs_read ON audit_logs FOR SELECT
  USING (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()));
CREATE POLICY audit_logs_append ON audit_logs FOR INSERT
  WITH CHECK (org_id = app_current_org() OR (org_id IS NULL AND app_is_platform()));

GRANT SELECT ON audit_logs TO agentbox_app;
GRANT INSERT (org_id, actor_sub, actor_role, action, target, outcome, reason, ip, user_agent, request_id,
              details) ON audit_logs TO agentbox_app;
REVOKE UPDATE, DELETE, TRUNCATE ON audit_logs FROM agentbox_app;
GRANT EXECUTE ON FUNCTION audit_chain_state(), audit_ensure_partitions(integer) TO agentbox_app;
GRANT EXECUTE ON FUNCTION audit_append(boolean, text, text, text, text, text, text, text, inet, text, text,
                                       jsonb) TO agentbox_app;
