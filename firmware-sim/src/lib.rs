//! firmware-sim: simulators for the parts around telegate, for its tests, its demo and load runs.
//!
//! They speak only telegate's wire contracts (DESIGN.md, "Wire contracts"), never its code, so they also check
//! that the gateway keeps those contracts.
//!
//! - [`arc`]: an alarm receiving centre. It receives signed deliveries over HTTP, answers them as a provider
//!   would (accept, duplicate, unavailable, reject, or a closed port), and reports progress (answered,
//!   resolved) back to the gateway's API after configurable operator delays.
//! - [`fleet`]: a fleet of telecare devices. They share a few MQTT connections, raise alarms at a set rate
//!   from a seed (a realistic mix of classes, in the `event`, `cid` and `sia` forms), send heartbeats, re-send
//!   each alarm until the gateway acknowledges it, and on request inject duplicates, malformed payloads and
//!   reboots; they count what they sent and how the gateway answered.
//! - [`serial`]: an alarm receiver (Sur-Gard output or raw Contact ID) or a line of dispersed units
//!   (`telecare-line`) on a pseudo-terminal the gateway opens as its serial port. It writes lines at a set
//!   rate and baud rate from a seed, re-sends each line until the gateway acknowledges it, and on request
//!   writes garbage before lines and unplugs and replugs the port. [`serial::PtyLink`] is the bare port, for
//!   tests that speak the serial contracts themselves.
//!
//! The `firmware-sim` binary runs each simulator from the command line (`firmware-sim arc …`,
//! `firmware-sim fleet …`, `firmware-sim serial …`).

#![forbid(unsafe_code)]

pub mod arc;
pub mod fleet;
#[cfg(unix)]
pub mod serial;

pub use arc::{
    sign, Accepted, ArcConfig, ArcSim, ArcStats, Delay, DelayParseError, Mode, ProgressReport,
    ProgressState,
};
pub use fleet::{Fleet, FleetConfig, FleetStats, Mix, SentAlarm};
#[cfg(unix)]
pub use serial::{LineFormat, PtyLink, SentLine, SerialSim, SerialSimConfig, SerialStats};
