-- The PostgreSQL twin of migrations/sqlite: the same tables, columns and indexes, so that both
-- backends share the Rust side. Timestamps are milliseconds since the Unix epoch (UTC) as BIGINT;
-- provider lists (`chain`, `rejected`) are JSON arrays kept as TEXT, as in SQLite.

-- Alarms as normalised at ingest.
CREATE TABLE alarms (
    id           TEXT PRIMARY KEY,          -- UUIDv7, time-ordered
    tenant       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    account      TEXT,
    seq          BIGINT,
    class        TEXT NOT NULL,
    priority     BIGINT NOT NULL,
    restore      BOOLEAN NOT NULL,
    zone         BIGINT,
    sensor       TEXT,
    battery_pct  BIGINT,
    rssi         BIGINT,
    lat          DOUBLE PRECISION,
    lon          DOUBLE PRECISION,
    text         TEXT,
    raised_at    BIGINT,                    -- device clock, when sent
    received_at  BIGINT NOT NULL,
    stored_at    BIGINT NOT NULL,
    source_kind  TEXT NOT NULL,
    source_id    TEXT NOT NULL,
    source_code  TEXT NOT NULL,
    raw          BYTEA NOT NULL,
    dedupe_key   TEXT NOT NULL
);
CREATE INDEX alarms_dedupe ON alarms (dedupe_key, received_at);
CREATE INDEX alarms_tenant_received ON alarms (tenant, received_at);

-- Stages after ingest (delivery attempts, accepted, answered, resolved, dead letter), appended as they
-- happen. For answered/resolved, `at` is the provider's time and `reported_at` when the report arrived.
-- `id` keeps the order of appending among rows with the same `at` (SQLite's implicit rowid).
CREATE TABLE alarm_stages (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    alarm_id     TEXT NOT NULL REFERENCES alarms (id),
    stage        TEXT NOT NULL,
    at           BIGINT NOT NULL,
    provider     TEXT,
    detail       TEXT,
    reported_at  BIGINT
);
CREATE INDEX alarm_stages_alarm ON alarm_stages (alarm_id, at);
CREATE UNIQUE INDEX alarm_stages_progress ON alarm_stages (alarm_id, stage)
    WHERE stage IN ('answered', 'resolved');

-- One row per alarm, written in the same transaction as the alarm with its route; the dispatchers
-- (one per gateway instance) claim due rows with a lease (FOR UPDATE SKIP LOCKED) and move them
-- along the provider chain.
CREATE TABLE outbox (
    alarm_id           TEXT PRIMARY KEY REFERENCES alarms (id),
    priority           BIGINT NOT NULL,
    state              TEXT NOT NULL,                -- pending | delivered | dead_letter
    contract_id        TEXT,                         -- NULL: uncontracted, default provider
    chain              TEXT NOT NULL,                -- JSON array of provider ids, primary first
    position           BIGINT NOT NULL DEFAULT 0,    -- index in chain of the provider being tried
    rejected           TEXT NOT NULL DEFAULT '[]',   -- JSON array of providers that rejected permanently
    exhausted          BOOLEAN NOT NULL DEFAULT FALSE, -- every deadline passed: the chain is retried in turn
    failover_after_ms  BIGINT NOT NULL,
    stored_at          BIGINT NOT NULL,
    routed_at          BIGINT NOT NULL,
    due_at             BIGINT NOT NULL,
    attempts           BIGINT NOT NULL DEFAULT 0,
    provider_attempts  BIGINT NOT NULL DEFAULT 0,
    lease_owner        TEXT,
    lease_until        BIGINT,
    accepted_at        BIGINT,
    accepted_by        TEXT
);
CREATE INDEX outbox_due ON outbox (state, priority, due_at);

-- Input that could not be accepted, kept raw for inspection.
CREATE TABLE quarantine (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  BIGINT NOT NULL,
    source_kind  TEXT NOT NULL,
    source_id    TEXT NOT NULL,
    reference    TEXT NOT NULL,             -- topic, port, ...
    tenant       TEXT,
    device_id    TEXT,
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    raw          BYTEA NOT NULL
);
CREATE INDEX quarantine_received ON quarantine (received_at);
