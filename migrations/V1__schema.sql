-- milvus-sidecar metadata schema: the seed's tables, filled by the sidecar from the traffic
-- it forwards. Keys are UUIDv7 (time-ordered); times are timestamptz.

-- UUIDv7 for rows created in SQL (the sidecar makes its own ids): a random UUID whose
-- first 48 bits are replaced by the Unix time in milliseconds, version nibble set to 7.
CREATE FUNCTION uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$$;

-- ---------------------------------------------------------------- users and permissions

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT uuid_v7(),
    username      text NOT NULL UNIQUE CHECK (username <> '' AND length(username) <= 256),
    email         text,
    -- argon2id PHC string; NULL means the user cannot log in with a password.
    password_hash text,
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    is_active     boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    last_login    timestamptz
);

-- ---------------------------------------------------------------- the Milvus mirror

CREATE TABLE collections (
    id                   uuid PRIMARY KEY DEFAULT uuid_v7(),
    -- Milvus names a collection by (database, name).
    database_name        text NOT NULL DEFAULT 'default',
    collection_name      text NOT NULL,
    dimension            integer CHECK (dimension > 0),
    metric_type          text,
    description          text,
    -- The schema's fields as Milvus described them: [{name, data_type, dim, is_primary_key...}].
    fields               jsonb NOT NULL DEFAULT '[]',
    shards_num           integer,
    milvus_collection_id bigint,
    status               text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'dropped')),
    created_by           uuid REFERENCES users (id) ON DELETE SET NULL,
    metadata             jsonb NOT NULL DEFAULT '{}',
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    dropped_at           timestamptz
);
-- Dropped collections stay as history; only one live collection per name.
CREATE UNIQUE INDEX collections_live_name ON collections (database_name, collection_name) WHERE status = 'active';
CREATE INDEX collections_name ON collections (collection_name);

CREATE TABLE permissions (
    id              uuid PRIMARY KEY DEFAULT uuid_v7(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    collection_id   uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    permission_type text NOT NULL CHECK (permission_type IN ('read', 'write', 'admin')),
    granted_by      uuid REFERENCES users (id) ON DELETE SET NULL,
    granted_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, collection_id, permission_type)
);
CREATE INDEX permissions_collection ON permissions (collection_id);

CREATE TABLE collection_partitions (
    id             uuid PRIMARY KEY DEFAULT uuid_v7(),
    collection_id  uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    partition_name text NOT NULL,
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'dropped')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    dropped_at     timestamptz
);
CREATE UNIQUE INDEX collection_partitions_live_name
    ON collection_partitions (collection_id, partition_name) WHERE status = 'active';

CREATE TABLE index_management (
    id            uuid PRIMARY KEY DEFAULT uuid_v7(),
    collection_id uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    field_name    text NOT NULL,
    index_name    text NOT NULL,
    index_type    text,
    metric_type   text,
    params        jsonb NOT NULL DEFAULT '{}',
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending', 'in_progress', 'finished', 'failed', 'dropped')),
    indexed_rows  bigint,
    total_rows    bigint,
    pending_rows  bigint,
    fail_reason   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX index_management_live_name
    ON index_management (collection_id, index_name) WHERE state <> 'dropped';

-- ---------------------------------------------------------------- logs, partitioned by time
-- Each log table is range-partitioned by day; partitions are created ahead of time and
-- whole partitions are dropped past data_retention_days. The DEFAULT partition only
-- catches rows outside every day partition (a clock far off), so no insert ever fails.
-- Primary keys include the partition key, as PostgreSQL requires.

CREATE TABLE audit_logs (
    id              uuid NOT NULL,
    occurred_at     timestamptz NOT NULL,
    user_id         uuid REFERENCES users (id) ON DELETE SET NULL,
    username        text,
    action          text NOT NULL,
    resource_type   text NOT NULL CHECK (resource_type IN
                    ('collection', 'partition', 'index', 'database', 'alias', 'data', 'user', 'role',
                     'permission', 'resource_group', 'system', 'other')),
    resource_id     text,
    database_name   text,
    collection_id   uuid REFERENCES collections (id) ON DELETE SET NULL,
    success         boolean NOT NULL,
    grpc_code       smallint NOT NULL,
    milvus_code     integer NOT NULL DEFAULT 0,
    error_message   text,
    details         jsonb NOT NULL DEFAULT '{}',
    ip_address      inet,
    user_agent      text,
    PRIMARY KEY (id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX audit_logs_time ON audit_logs (occurred_at DESC);
CREATE INDEX audit_logs_user ON audit_logs (user_id, occurred_at DESC);
CREATE INDEX audit_logs_action ON audit_logs (action, occurred_at DESC);

CREATE TABLE performance_metrics (
    id             uuid NOT NULL,
    recorded_at    timestamptz NOT NULL,
    operation_type text NOT NULL,
    user_id        uuid REFERENCES users (id) ON DELETE SET NULL,
    database_name  text,
    collection_id  uuid REFERENCES collections (id) ON DELETE SET NULL,
    duration_ms    double precision NOT NULL CHECK (duration_ms >= 0),
    success        boolean NOT NULL,
    grpc_code      smallint NOT NULL,
    milvus_code    integer NOT NULL DEFAULT 0,
    error_message  text,
    request_bytes  bigint,
    reply_bytes    bigint,
    metadata       jsonb NOT NULL DEFAULT '{}',
    PRIMARY KEY (id, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE INDEX performance_metrics_time ON performance_metrics (recorded_at DESC);
CREATE INDEX performance_metrics_collection ON performance_metrics (collection_id, recorded_at DESC);
CREATE INDEX performance_metrics_operation ON performance_metrics (operation_type, recorded_at DESC);

CREATE TABLE query_logs (
    id                     uuid NOT NULL,
    executed_at            timestamptz NOT NULL,
    user_id                uuid REFERENCES users (id) ON DELETE SET NULL,
    username               text,
    database_name          text,
    collection_id          uuid REFERENCES collections (id) ON DELETE SET NULL,
    query_type             text NOT NULL CHECK (query_type IN ('search', 'hybrid_search', 'query')),
    duration_ms            double precision NOT NULL CHECK (duration_ms >= 0),
    success                boolean NOT NULL,
    top_k                  integer,
    nq                     integer,
    query_vector_dimension integer,
    search_params          jsonb NOT NULL DEFAULT '{}',
    filter_expression      text,
    output_fields          text[] NOT NULL DEFAULT '{}',
    result_count           bigint,
    error_message          text,
    PRIMARY KEY (id, executed_at)
) PARTITION BY RANGE (executed_at);
CREATE INDEX query_logs_time ON query_logs (executed_at DESC);
CREATE INDEX query_logs_collection ON query_logs (collection_id, executed_at DESC);
CREATE INDEX query_logs_user ON query_logs (user_id, executed_at DESC);

CREATE TABLE ingestion_logs (
    id                uuid NOT NULL,
    ingested_at       timestamptz NOT NULL,
    user_id           uuid REFERENCES users (id) ON DELETE SET NULL,
    username          text,
    database_name     text,
    collection_id     uuid REFERENCES collections (id) ON DELETE SET NULL,
    partition_name    text,
    operation         text NOT NULL CHECK (operation IN ('insert', 'upsert', 'delete', 'import')),
    rows_sent         bigint,
    rows_acknowledged bigint,
    bytes             bigint,
    duration_ms       double precision NOT NULL CHECK (duration_ms >= 0),
    success           boolean NOT NULL,
    error_message     text,
    PRIMARY KEY (id, ingested_at)
) PARTITION BY RANGE (ingested_at);
CREATE INDEX ingestion_logs_time ON ingestion_logs (ingested_at DESC);
CREATE INDEX ingestion_logs_collection ON ingestion_logs (collection_id, ingested_at DESC);

CREATE TABLE audit_logs_default PARTITION OF audit_logs DEFAULT;
CREATE TABLE performance_metrics_default PARTITION OF performance_metrics DEFAULT;
CREATE TABLE query_logs_default PARTITION OF query_logs DEFAULT;
CREATE TABLE ingestion_logs_default PARTITION OF ingestion_logs DEFAULT;

-- The log tables, for the maintenance functions below.
CREATE FUNCTION log_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY['audit_logs', 'performance_metrics', 'query_logs', 'ingestion_logs']
$$;

-- Creates the daily partitions from `from_day` through `from_day + days_ahead` that do not
-- exist yet (named <table>_pYYYYMMDD). Returns how many it created.
CREATE FUNCTION ensure_log_partitions(from_day date, days_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    day date;
    part text;
    created integer := 0;
BEGIN
    FOREACH tbl IN ARRAY log_tables() LOOP
        FOR i IN 0..days_ahead LOOP
            day := from_day + i;
            part := format('%s_p%s', tbl, to_char(day, 'YYYYMMDD'));
            IF to_regclass(part) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               part, tbl, day::timestamptz, (day + 1)::timestamptz);
                created := created + 1;
            END IF;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;

-- Drops the daily partitions whose whole day is older than `retention_days` before
-- `today`. Returns how many it dropped.
CREATE FUNCTION drop_expired_log_partitions(today date, retention_days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    part record;
    dropped integer := 0;
BEGIN
    FOREACH tbl IN ARRAY log_tables() LOOP
        FOR part IN
            SELECT c.relname
            FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            JOIN pg_class p ON p.oid = i.inhparent
            WHERE p.relname = tbl
              AND c.relname ~ ('^' || tbl || '_p[0-9]{8}$')
              AND to_date(right(c.relname, 8), 'YYYYMMDD') < today - retention_days
        LOOP
            EXECUTE format('DROP TABLE %I', part.relname);
            dropped := dropped + 1;
        END LOOP;
    END LOOP;
    RETURN dropped;
END
$$;

SELECT ensure_log_partitions(current_date - 1, 8);

-- ---------------------------------------------------------------- configuration

CREATE TABLE system_config (
    config_key   text PRIMARY KEY,
    config_value text NOT NULL,
    config_type  text NOT NULL DEFAULT 'string' CHECK (config_type IN ('string', 'integer', 'boolean', 'json')),
    description  text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    updated_by   text
);

INSERT INTO system_config (config_key, config_value, config_type, description) VALUES
    ('milvus_api_endpoint', 'milvus-proxy.milvus.svc.cluster.local:19530', 'string', 'Milvus proxy the sidecar stands in front of'),
    ('max_query_timeout', '300', 'integer', 'Longest deadline (seconds) a Search or Query call may have'),
    ('default_top_k', '10', 'integer', 'Default number of results for a search'),
    ('enable_audit_logging', 'true', 'boolean', 'Write audit_logs rows'),
    ('enable_performance_monitoring', 'true', 'boolean', 'Write performance_metrics rows'),
    ('data_retention_days', '90', 'integer', 'Days of log partitions kept before they are dropped'),
    ('audit_all_calls', 'false', 'boolean', 'Audit every call, not only state changes and refusals'),
    ('users_may_create_collections', 'true', 'boolean', 'Whether role user may create collections (else admins only)');

-- Running sidecars LISTEN on this channel and reload their settings when a row changes.
CREATE FUNCTION notify_config_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('milvus_sidecar_config', coalesce(NEW.config_key, OLD.config_key));
    RETURN NULL;
END
$$;
CREATE TRIGGER system_config_changed AFTER INSERT OR UPDATE OR DELETE ON system_config
    FOR EACH ROW EXECUTE FUNCTION notify_config_change();

-- Running sidecars LISTEN here and drop their cached identities and grants, so a change
-- made anywhere (CLI, SQL, another sidecar) applies everywhere within moments.
CREATE FUNCTION notify_auth_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('milvus_sidecar_auth', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE TRIGGER users_changed AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER permissions_changed AFTER INSERT OR UPDATE OR DELETE ON permissions
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();
CREATE TRIGGER collections_changed AFTER INSERT OR UPDATE OR DELETE ON collections
    FOR EACH STATEMENT EXECUTE FUNCTION notify_auth_change();

-- ---------------------------------------------------------------- views

CREATE VIEW collection_stats AS
SELECT c.database_name,
       c.collection_name,
       c.dimension,
       (SELECT count(*) FROM collection_partitions p
         WHERE p.collection_id = c.id AND p.status = 'active') AS partition_count,
       (SELECT count(DISTINCT pm.user_id) FROM permissions pm WHERE pm.collection_id = c.id) AS user_count,
       q.avg_query_duration,
       coalesce(q.total_queries, 0) AS total_queries,
       coalesce(q.successful_queries, 0) AS successful_queries
FROM collections c
LEFT JOIN LATERAL (
    SELECT avg(duration_ms) AS avg_query_duration,
           count(*) AS total_queries,
           count(*) FILTER (WHERE success) AS successful_queries
    FROM query_logs ql
    WHERE ql.collection_id = c.id
) q ON true
WHERE c.status = 'active';
