//! telegate: the alarm-monitoring gateway of a commissioned telecare service.
//!
//! Signals from alarm units, pendants, fall detectors, environmental sensors
//! and alarm receivers arrive over MQTT and serial lines. telegate normalises
//! each into one [`model::Alarm`], stores it durably, routes it to the
//! provider contracted for that client at that moment, delivers it, and keeps
//! every stage's timestamp so that service levels can be checked.
//!
//! # The map, in data-flow order
//!
//! | stage | module | what it does |
//! | --- | --- | --- |
//! | source | [`source`] | MQTT topics and serial ports in; payloads and lines become typed wire messages and are normalised into a [`model::NewAlarm`] ([`taxonomy`] maps codes to classes) |
//! | ingest | [`ingest`] | a bounded queue in front of one group-commit writer: batches are de-duplicated, routed and committed in one transaction, then each sender is answered |
//! | store | [`store`] | alarms, outbox, stage timestamps and quarantine in SQLite or PostgreSQL, migrated at start |
//! | route | [`route`] | the contract in force for the tenant on the alarm's day; the route is stored with the alarm |
//! | deliver | [`deliver`] | outbox rows claimed with a lease, signed webhooks, retries, failover, dead letters |
//! | sla | [`sla`] | service levels per contract from the stage timestamps |
//! | report | [`sla::render_table`] | the SLA table (the `report` command comes later) |
//!
//! Around them: [`app`] wires and spawns the pipeline (read it top to
//! bottom); [`config`] is checked in full before anything uses it; [`api`]
//! takes provider progress reports and serves health and metrics;
//! [`broker`] is the embedded MQTT broker for demos, tests and small sites;
//! [`operator`] lists alarms that need a person and sends them again;
//! [`demo`] runs the whole service in one process with the simulators of
//! `firmware-sim`; [`metrics`] and [`events`] are what the gateway reports
//! about itself; [`clock`] injects wall-clock time.
//!
//! # The guarantees (DESIGN.md)
//!
//! 1. No alarm is lost: a signal is acknowledged to its sender only after it
//!    is committed to the store.
//! 2. Every stored alarm reaches a provider or an operator's attention.
//! 3. At-least-once delivery, de-duplicated: a re-send gets the same alarm id.
//! 4. Life first: priority lanes from routing on.
//! 5. Every stage is timestamped in the store.
//! 6. Bad input never stops the gateway: it is rejected, counted, logged and
//!    quarantined.
//! 7. Configuration is checked before it is used, all problems at once.
//! 8. Least privilege; secrets never appear in logs.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod broker;
pub mod clock;
pub mod config;
pub mod deliver;
pub mod demo;
pub mod events;
pub mod ingest;
pub mod metrics;
pub mod model;
pub mod operator;
pub mod route;
pub mod sla;
pub mod source;
pub mod store;
pub mod taxonomy;
