-- Audit checkpoints: the API signs every chain's head now and then with a key the database never holds
-- and keeps the signature outside it (agentbox.api.audit_checkpoints). A superuser who deletes a chain's
-- newest rows and moves audit_chain_heads back leaves a chain that verifies on its own; it no longer
-- reaches the signed head, and the verifier says so.
--
-- The checkpointer lists every chain's head in one query (the app otherwise sees only the chain of the
-- context it set), in the platform context only. Key '' is the platform chain.
CREATE FUNCTION audit_chain_heads_all(OUT chain text, OUT seq bigint, OUT hash bytea)
  RETURNS SETOF record
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
  AS $$
    SELECT h.chain, h.seq, h.hash FROM audit_chain_heads h WHERE app_is_platform() ORDER BY h.chain
  $$;
REVOKE EXECUTE ON FUNCTION audit_chain_heads_all() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_chain_heads_all() TO agentbox_app;
