-- Alarms as normalised at ingest. Timestamps are milliseconds since the Unix epoch (UTC).
CREATE TABLE alarms (
    id           TEXT PRIMARY KEY,          -- UUIDv7, time-ordered
    tenant       TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    account      TEXT,
    seq          INTEGER,
    class        TEXT NOT NULL,
    priority     INTEGER NOT NULL,
    restore      INTEGER NOT NULL,
    zone         INTEGER,
    sensor       TEXT,
    battery_pct  INTEGER,
    rssi         INTEGER,
    lat          REAL,
    lon          REAL,
    text         TEXT,
    raised_at    INTEGER,                   -- device clock, when sent
    received_at  INTEGER NOT NULL,
    stored_at    INTEGER NOT NULL,
    source_kind  TEXT NOT NULL,
    source_id    TEXT NOT NULL,
    source_code  TEXT NOT NULL,
    raw          BLOB NOT NULL,
    dedupe_key   TEXT NOT NULL
);
CREATE INDEX alarms_dedupe ON alarms (dedupe_key, received_at);
CREATE INDEX alarms_tenant_received ON alarms (tenant, received_at);

-- Stages after ingest (delivery attempts, accepted, answered, resolved, dead letter), appended as they
-- happen. For answered/resolved, `at` is the provider's time and `reported_at` when the report arrived.
CREATE TABLE alarm_stages (
    alarm_id     TEXT NOT NULL REFERENCES alarms (id),
    stage        TEXT NOT NULL,
    at           INTEGER NOT NULL,
    provider     TEXT,
    detail       TEXT,
    reported_at  INTEGER
);
CREATE INDEX alarm_stages_alarm ON alarm_stages (alarm_id, at);
CREATE UNIQUE INDEX alarm_stages_progress ON alarm_stages (alarm_id, stage)
    WHERE stage IN ('answered', 'resolved');

-- One row per alarm, written in the same transaction as the alarm with its route; the dispatcher
-- claims due rows with a lease and moves them along the provider chain.
CREATE TABLE outbox (
    alarm_id           TEXT PRIMARY KEY REFERENCES alarms (id),
    priority           INTEGER NOT NULL,
    state              TEXT NOT NULL,             -- pending | delivered | dead_letter
    contract_id        TEXT,                      -- NULL: uncontracted, default provider
    chain              TEXT NOT NULL,             -- JSON array of provider ids, primary first
    position           INTEGER NOT NULL DEFAULT 0,-- index in chain of the provider being tried
    rejected           TEXT NOT NULL DEFAULT '[]',-- JSON array of providers that rejected permanently
    exhausted          INTEGER NOT NULL DEFAULT 0,-- every deadline passed: the chain is retried in turn
    failover_after_ms  INTEGER NOT NULL,
    stored_at          INTEGER NOT NULL,
    routed_at          INTEGER NOT NULL,
    due_at             INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    provider_attempts  INTEGER NOT NULL DEFAULT 0,
    lease_owner        TEXT,
    lease_until        INTEGER,
    accepted_at        INTEGER,
    accepted_by        TEXT
);
CREATE INDEX outbox_due ON outbox (state, priority, due_at);

-- Input that could not be accepted, kept raw for inspection.
CREATE TABLE quarantine (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at  INTEGER NOT NULL,
    source_kind  TEXT NOT NULL,
    source_id    TEXT NOT NULL,
    reference    TEXT NOT NULL,             -- topic, port, ...
    tenant       TEXT,
    device_id    TEXT,
    reason       TEXT NOT NULL,
    detail       TEXT NOT NULL,
    raw          BLOB NOT NULL
);
CREATE INDEX quarantine_received ON quarantine (received_at);
