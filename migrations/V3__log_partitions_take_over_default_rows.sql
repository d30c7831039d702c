-- Log partitions and the DEFAULT partition.
--
-- A log row lands in its table's DEFAULT partition when its day has no partition yet: the
-- sidecar was down for longer than the week created ahead and calls were recorded before
-- maintenance ran at start-up, spilled records were replayed late, or a clock was far off.
-- V1's functions then went wrong in two ways:
--   * PostgreSQL refuses to create a day's partition while the DEFAULT partition holds rows
--     of that day ("updated partition constraint for default partition would be violated"),
--     and as every day was created in one statement, one such row stopped every later
--     partition from being created, for good: all new rows then went to DEFAULT.
--   * Retention dropped day partitions only, so rows in DEFAULT were kept for ever.
-- Now each missing day is created on its own, taking over the rows DEFAULT holds for it;
-- a day that cannot be created is reported and the others still are; and retention also
-- deletes expired rows from the DEFAULT partitions.

-- The partition key column of a partitioned table, and its DEFAULT partition (NULL if none).
CREATE FUNCTION log_partitioning(tbl text, OUT time_column text, OUT default_partition regclass)
LANGUAGE sql STABLE AS $$
    SELECT a.attname::text, nullif(p.partdefid, 0)::regclass
    FROM pg_partitioned_table p
    JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
    WHERE p.partrelid = tbl::regclass
$$;

-- Creates the partition of `tbl` for `day` (named <tbl>_pYYYYMMDD) unless it exists, moving
-- into it the rows of that day that wait in the DEFAULT partition. Returns whether it
-- created one. Raises when it cannot; nothing is changed then.
CREATE FUNCTION ensure_log_partition(tbl text, day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('%s_p%s', tbl, to_char(day, 'YYYYMMDD'));
    -- Computed once: the bounds of the new partition and of the rows moved into it must
    -- be the same instants.
    lower_bound timestamptz := day::timestamptz;
    upper_bound timestamptz := (day + 1)::timestamptz;
    time_col text;
    def regclass;
    waiting boolean;
    column_list text;
BEGIN
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    SELECT time_column, default_partition INTO time_col, def FROM log_partitioning(tbl);
    IF def IS NOT NULL THEN
        -- Creating or attaching a partition takes this lock anyway; taken first, no row of
        -- this day can reach DEFAULT between the look below and the move.
        EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', def);
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE %I >= $1 AND %I < $2)', def, time_col, time_col)
            INTO waiting USING lower_bound, upper_bound;
    END IF;
    IF NOT coalesce(waiting, false) THEN
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       part, tbl, lower_bound, upper_bound);
        RETURN true;
    END IF;
    -- PostgreSQL cannot create a partition over rows DEFAULT holds: build it as a plain
    -- table, move the rows, then attach it (which adds the parent's indexes).
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO column_list
    FROM pg_attribute
    WHERE attrelid = tbl::regclass AND attnum > 0 AND NOT attisdropped;
    EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part, tbl);
    EXECUTE format('WITH moved AS (DELETE FROM %s WHERE %I >= $1 AND %I < $2 RETURNING %s)
                    INSERT INTO %I (%s) SELECT %s FROM moved',
                   def, time_col, time_col, column_list, part, column_list, column_list)
        USING lower_bound, upper_bound;
    EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   tbl, part, lower_bound, upper_bound);
    RETURN true;
END
$$;

-- Creates the daily partitions from `from_day` through `from_day + days_ahead` that do not
-- exist yet, each on its own: a day that fails is reported as a WARNING and skipped.
-- Returns how many it created.
CREATE OR REPLACE FUNCTION ensure_log_partitions(from_day date, days_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    tbl text;
    day date;
    created integer := 0;
BEGIN
    FOREACH tbl IN ARRAY log_tables() LOOP
        FOR i IN 0..days_ahead LOOP
            day := from_day + i;
            BEGIN
                IF ensure_log_partition(tbl, day) THEN
                    created := created + 1;
                END IF;
            EXCEPTION WHEN OTHERS THEN
                RAISE WARNING 'cannot create the % partition for %: %', tbl, day, SQLERRM;
            END;
        END LOOP;
    END LOOP;
    RETURN created;
END
$$;

-- Drops the daily partitions whose whole day is older than `retention_days` before
-- `today`, and deletes the rows of those days from the DEFAULT partitions. Returns how
-- many partitions it dropped.
CREATE OR REPLACE FUNCTION drop_expired_log_partitions(today date, retention_days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    cutoff timestamptz := (today - retention_days)::timestamptz;
    tbl text;
    part record;
    time_col text;
    def regclass;
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
        -- Only the DEFAULT partition: the day partitions of these days are gone already.
        SELECT time_column, default_partition INTO time_col, def FROM log_partitioning(tbl);
        IF def IS NOT NULL THEN
            EXECUTE format('DELETE FROM %s WHERE %I < $1', def, time_col) USING cutoff;
        END IF;
    END LOOP;
    RETURN dropped;
END
$$;

-- Days a stopped sidecar left in DEFAULT move out now rather than at the next start.
SELECT ensure_log_partitions(current_date - 1, 8);
