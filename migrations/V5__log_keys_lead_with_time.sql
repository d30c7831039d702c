-- The log tables' primary keys lead with their time column, (time, id) instead of (id, time),
-- and the separate time indexes go; performance_metrics loses its (operation_type, time) index.
--
-- A log row costs PostgreSQL one B-tree insert per index, most of what it spends on the row.
-- The same key in the other order orders rows by time, so it serves the range scans and
-- newest-first reads the time index served, and that index is not needed. Nothing reads
-- performance_metrics by operation type alone: the statistics group a time range by it.
-- Measured: 100 000 performance_metrics and 100 000 query_logs rows of a Search bench,
-- COPYed in one transaction into copies of these tables, alternated rounds: 1 029-1 074 ms
-- as in V4, 785-822 ms as here (-24 %); without the operation index alone, 921-945 ms.
--
-- Swapping a key takes no rebuild once every partition has a unique index on (time, id):
-- the old key is dropped, each partition's index becomes its primary key, and the parent's
-- new key takes those over (swap_log_primary_key, one short transaction per table). Empty
-- partitions get their index in that transaction. Those that hold rows get it from the
-- sidecar's maintenance first, built CONCURRENTLY (log_keys_missing), so the record
-- writer is never stopped behind a long build; until then the table keeps its old key
-- and time index. A fresh database has its keys swapped here.

DROP INDEX performance_metrics_operation;

-- The column a log table is partitioned by (its time).
CREATE FUNCTION log_time_column(tbl regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT a.attname::text
    FROM pg_partitioned_table p
    JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
    WHERE p.partrelid = tbl
$$;

-- Whether tbl's primary key is still V1's (id, time).
CREATE FUNCTION log_key_swap_pending(tbl regclass) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(bool_or(a.attname = 'id'), false)
    FROM pg_index i
    JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = tbl AND i.indisprimary
$$;

-- The name of the unique (time, id) index a partition gets before the swap makes it its key.
CREATE FUNCTION log_key_index_name(part regclass) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT left(relname || '_time_id', 63) FROM pg_class WHERE oid = part
$$;

-- Whether part has a valid index of that name (an invalid one is a build broken off).
CREATE FUNCTION log_key_index_ready(part regclass) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = part AND c.relname = log_key_index_name(part) AND i.indisvalid
    )
$$;

-- The partitions, of tables whose key is still to be swapped, that hold rows and lack their
-- (time, id) index: the partition, the index's name and its columns ("(executed_at, id)").
-- The sidecar's maintenance builds these with CREATE UNIQUE INDEX CONCURRENTLY.
CREATE FUNCTION log_keys_missing()
RETURNS TABLE (log_partition regclass, index_name text, definition text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    tbl text;
    has_rows boolean;
BEGIN
    FOREACH tbl IN ARRAY log_tables() LOOP
        CONTINUE WHEN NOT log_key_swap_pending(tbl::regclass);
        FOR log_partition IN
            SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = tbl::regclass ORDER BY 1::text
        LOOP
            CONTINUE WHEN log_key_index_ready(log_partition);
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', log_partition) INTO has_rows;
            CONTINUE WHEN NOT has_rows;
            index_name := log_key_index_name(log_partition);
            definition := format('(%I, id)', log_time_column(tbl::regclass));
            RETURN NEXT;
        END LOOP;
    END LOOP;
END
$$;

-- Makes (time, id) tbl's primary key and drops its time index. Changes nothing and returns
-- false while a partition that holds rows lacks its index (log_keys_missing); true once the
-- key leads with time. Locks the table for the swap alone: no index is built on a partition
-- with rows here.
CREATE FUNCTION swap_log_primary_key(tbl regclass) RETURNS boolean
-- Not a notice per partition that ADD CONSTRAINT ... USING INDEX renames its index.
LANGUAGE plpgsql SET client_min_messages = warning AS $$
DECLARE
    parts regclass[];
    part regclass;
    idx text;
    has_rows boolean;
    key_name text;
BEGIN
    IF NOT log_key_swap_pending(tbl) THEN
        RETURN true;
    END IF;
    -- Taken first, for the whole table: rows cannot reach an empty partition between the
    -- check below and its index build.
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', tbl);
    SELECT array_agg(inhrelid::regclass ORDER BY inhrelid) INTO parts FROM pg_inherits WHERE inhparent = tbl;
    FOREACH part IN ARRAY coalesce(parts, '{}') LOOP
        CONTINUE WHEN log_key_index_ready(part);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s)', part) INTO has_rows;
        IF has_rows THEN
            RETURN false;
        END IF;
    END LOOP;

    SELECT conname INTO key_name FROM pg_constraint WHERE conrelid = tbl AND contype = 'p';
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', tbl, key_name);
    FOREACH part IN ARRAY coalesce(parts, '{}') LOOP
        idx := log_key_index_name(part);
        IF NOT log_key_index_ready(part) THEN
            IF to_regclass(quote_ident(idx)) IS NOT NULL THEN
                -- An invalid leftover of a broken-off build, on a partition now empty.
                EXECUTE format('DROP INDEX %I', idx);
            END IF;
            EXECUTE format('CREATE UNIQUE INDEX %I ON %s (%I, id)', idx, part, log_time_column(tbl));
        END IF;
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I',
                       part, left((SELECT relname FROM pg_class WHERE oid = part) || '_pkey', 63), idx);
    END LOOP;
    -- Finds each partition's key and takes it over: nothing is built.
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY (%I, id)', tbl, key_name, log_time_column(tbl));
    EXECUTE format('DROP INDEX IF EXISTS %I', (SELECT relname FROM pg_class WHERE oid = tbl) || '_time');
    RETURN true;
END
$$;

SELECT tbl, swap_log_primary_key(tbl::regclass) AS swapped FROM unnest(log_tables()) AS tbl;
