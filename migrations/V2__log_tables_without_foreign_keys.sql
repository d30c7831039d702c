-- The log tables are an append-only record of what happened. Their foreign keys cost
-- PostgreSQL a trigger and an index probe per row per key: a profile of the writer's
-- backend had 37% of its CPU in those checks. They also made the trail depend on the
-- present: deleting a user or collection rewrote its history (ON DELETE SET NULL). The
-- ids stay, with the indexes that find them; query_logs, ingestion_logs and audit_logs also
-- keep the user name as it was when the call was made.
ALTER TABLE audit_logs DROP CONSTRAINT audit_logs_user_id_fkey;
ALTER TABLE audit_logs DROP CONSTRAINT audit_logs_collection_id_fkey;
ALTER TABLE performance_metrics DROP CONSTRAINT performance_metrics_user_id_fkey;
ALTER TABLE performance_metrics DROP CONSTRAINT performance_metrics_collection_id_fkey;
ALTER TABLE query_logs DROP CONSTRAINT query_logs_user_id_fkey;
ALTER TABLE query_logs DROP CONSTRAINT query_logs_collection_id_fkey;
ALTER TABLE ingestion_logs DROP CONSTRAINT ingestion_logs_user_id_fkey;
ALTER TABLE ingestion_logs DROP CONSTRAINT ingestion_logs_collection_id_fkey;
