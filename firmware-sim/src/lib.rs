//! firmware-sim: simulators for the parts around telegate, for its tests, its demo and load runs.
//!
//! They speak only telegate's wire contracts (DESIGN.md, "Wire contracts"), never its code, so they also check
//! that the gateway keeps those contracts.
//!
//! - [`arc`]: an alarm receiving centre. It receives signed deliveries over HTTP, answers them as a provider
//!   would (accept, duplicate, unavailable, reject, or a closed port), and reports progress (answered,
//!   resolved) back to the gateway's API after configurable operator delays.
//! - `fleet` (to come): simulated devices that raise alarms over MQTT and serial lines.
//!
//! The `firmware-sim` binary runs each simulator from the command line (`firmware-sim arc …`).

#![forbid(unsafe_code)]

pub mod arc;

pub use arc::{
    sign, Accepted, ArcConfig, ArcSim, ArcStats, Delay, DelayParseError, Mode, ProgressReport,
    ProgressState,
};
