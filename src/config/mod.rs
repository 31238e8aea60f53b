//! Configuration: one TOML file, checked in full before anything uses it.
//!
//! Loading runs in two phases, and every problem of every phase is collected
//! before the load fails (DESIGN.md guarantee 7):
//!
//! 1. text → [`toml::Table`] (a syntax error is the one problem, reported
//!    with its line and column) → `${NAME}` substitution in every string
//!    value (`env.rs`) → a raw serde struct (`raw.rs`) that reports every
//!    unknown key and every type error with its key path;
//! 2. raw struct → [`Config`] (`validate.rs`): ranges, formats, unique ids,
//!    references between providers, contracts and routing, and overlapping
//!    contracts.
//!
//! A [`Config`] that exists is valid: its invariants hold and nothing else
//! needs to check them again. Key paths are dotted TOML paths with array
//! indexes in brackets (`provider[1].url`, `contract[0].fallback[1]`), and
//! [`ConfigError::lines`] renders each problem as `FILE: key.path: message`,
//! the form `telegate check` prints. Secrets are held in [`Secret`], whose
//! `Debug` and `Display` print `***`; problem messages name ids, tenants and
//! references but never repeat a secret, a URL or a value of the wrong type.

mod env;
mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;

/// The validated configuration of one gateway process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where alarms, the outbox and the stage timestamps are kept.
    pub store: StoreConfig,
    /// The progress API, reports, health and metrics.
    pub api: ApiConfig,
    /// Group commit and de-duplication settings (`[ingest]`).
    pub ingest: IngestConfig,
    /// The delivery dispatcher (`[deliver]`).
    pub deliver: DeliverConfig,
    /// How long closed alarms are kept (`[retention]`).
    pub retention: RetentionConfig,
    /// MQTT sources (`[[mqtt]]`), in file order.
    pub mqtt: Vec<MqttConfig>,
    /// Serial sources (`[[serial]]`), in file order.
    pub serial: Vec<SerialConfig>,
    /// Monitoring providers (`[[provider]]`), in file order; ids are unique.
    pub providers: Vec<ProviderConfig>,
    /// Contracts (`[[contract]]`), in file order; ids are unique and no two
    /// contracts cover the same tenant on the same day.
    pub contracts: Vec<ContractConfig>,
    /// Where alarms go that no contract covers.
    pub routing: RoutingConfig,
}

impl Config {
    /// Reads and checks the configuration file at `path`, substituting
    /// `${NAME}` from the process environment.
    ///
    /// # Errors
    ///
    /// Every problem found, each with its key path; a file that cannot be
    /// read is one problem with the path `(file)`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::from_toml_str(&text, &file, &|name| std::env::var(name).ok()),
            Err(err) => Err(ConfigError {
                file,
                problems: vec![ConfigProblem::new("(file)", format!("cannot read: {err}"))],
            }),
        }
    }

    /// Checks a configuration given as TOML text. `file` is only used in the
    /// error lines; `env` looks up the variables named by `${NAME}`, so tests
    /// can inject them instead of setting the process environment.
    ///
    /// # Errors
    ///
    /// Every problem found, each with its key path.
    pub fn from_toml_str(
        text: &str,
        file: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_owned(),
            problems,
        };
        let mut table = match text.parse::<toml::Table>() {
            Ok(table) => table,
            Err(err) => return Err(fail(vec![syntax_problem(text, &err)])),
        };

        let mut problems = Vec::new();
        // Key paths whose value is already reported as broken; checks of
        // phase 2 stay quiet about them instead of piling on.
        let mut broken = Vec::new();
        env::substitute_table(&mut table, env, &mut problems, &mut broken);
        let decoded = raw::decode(toml::Value::Table(table), &mut problems, &mut broken);

        let config = decoded.and_then(|raw| {
            let mut checker = validate::Checker::new(&broken);
            let config = checker.config(raw);
            problems.extend(checker.into_problems());
            config
        });

        dedup_in_order(&mut problems);
        problems.sort_by_key(|problem| location(&problem.path));
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ if problems.is_empty() => Err(fail(vec![ConfigProblem::new(
                "(file)",
                "configuration could not be read",
            )])),
            _ => Err(fail(problems)),
        }
    }

    /// The provider with this id, if one is defined.
    pub fn provider(&self, id: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|provider| provider.id == id)
    }
}

/// The store's database, from `store.url`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: a file, relative to the working directory unless
    /// absolute (`sqlite:///var/lib/telegate/telegate.db`).
    Sqlite(PathBuf),
    /// `postgres://…` or `postgresql://…`, kept as written for the driver.
    Postgres(String),
}

impl fmt::Debug for StoreUrl {
    // A PostgreSQL URL may carry a password: it never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            StoreUrl::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&redact_password(url))
                .finish(),
        }
    }
}

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The database; `sqlite://data/telegate.db` when `[store]` is absent.
    pub url: StoreUrl,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: StoreUrl::Sqlite(PathBuf::from("data/telegate.db")),
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Address of the progress API, reports, health and metrics;
    /// `127.0.0.1:8080` by default.
    pub listen: SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

/// `[ingest]`: group commit, de-duplication and the bounded ingest queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    /// Most signals committed in one transaction (`batch_max`, 1..=10000).
    pub batch_max: usize,
    /// How long a batch waits for more signals (`batch_wait_ms`, 0..=1000).
    pub batch_wait: Duration,
    /// Under load, the least time from the start of one commit to the start
    /// of the next (`commit_interval_ms`, 0..=1000; 0 commits as soon as the
    /// last commit ended). See [`crate::ingest`].
    pub commit_interval: Duration,
    /// How long a re-send is recognised as the same alarm
    /// (`dedupe_window_s`, at least 1).
    pub dedupe_window: Duration,
    /// Capacity of the bounded queue in front of the store (`queue`, at
    /// least 1); sources wait when it is full.
    pub queue: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            batch_max: 512,
            batch_wait: Duration::from_millis(2),
            commit_interval: Duration::from_millis(10),
            dedupe_window: Duration::from_secs(600),
            queue: 10_000,
        }
    }
}

/// `[deliver]`: how the dispatcher claims and delivers outbox rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliverConfig {
    /// Names this gateway instance as the owner of its outbox claims
    /// (`instance_id`, default `telegate`); unique per instance sharing a
    /// database. Claims of the same id are released at start-up.
    pub instance_id: String,
    /// How long a claim lasts before another instance may take the row
    /// over (`lease_s`, 5..=3600, default 30).
    pub lease: Duration,
    /// How often due retries are looked for when nothing new arrives
    /// (`poll_ms`, 10..=10000, default 200).
    pub poll: Duration,
    /// Deliveries in flight per provider and lane (`max_in_flight`,
    /// 1..=1024, default 32); life-safety and technical alarms have
    /// separate lanes.
    pub max_in_flight: usize,
    /// Most outbox rows claimed at once (`claim_batch`, 1..=10000,
    /// default 256).
    pub claim_batch: usize,
}

impl Default for DeliverConfig {
    fn default() -> Self {
        DeliverConfig {
            instance_id: "telegate".to_owned(),
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(200),
            max_in_flight: 32,
            claim_batch: 256,
        }
    }
}

/// `[retention]`: how long closed alarms are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// Alarms a provider accepted are deleted this long after they were
    /// received (`days`, default 400: a year's contract review and some);
    /// `None` (`days = 0`) keeps everything. Dead letters and alarms still
    /// being delivered are never pruned.
    pub keep: Option<Duration>,
    /// Alarms deleted per transaction (`batch`, 1..=10000, default 500), so
    /// that ingest waits at most for one small batch.
    pub batch: u32,
    /// How often the pruning pass runs (`interval_s`, 60..=86400, default 3600).
    pub interval: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep: Some(Duration::from_secs(400 * 86_400)),
            batch: 500,
            interval: Duration::from_secs(3600),
        }
    }
}

/// An MQTT broker address from `mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// `embedded://`: start the in-process broker on this address.
    pub embedded: bool,
    /// Host name or IP address (an IPv6 address without brackets); an IP
    /// address when `embedded`.
    pub host: String,
    /// 1883 when an `mqtt://` URL names none; always given for `embedded://`.
    pub port: u16,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.embedded { "embedded" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// `[[mqtt]]`: one MQTT source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    /// Source id, unique among all sources (MQTT and serial).
    pub id: String,
    /// The broker.
    pub url: BrokerUrl,
    /// MQTT client id, 1–64 characters of `[A-Za-z0-9._-]`.
    pub client_id: String,
    /// Subscribe through `$share/{group}/…` so that several gateways share
    /// the load.
    pub shared_group: Option<String>,
    /// Broker credentials; a password is only allowed with a username.
    pub username: Option<String>,
    /// Broker password.
    pub password: Option<Secret>,
    /// MQTT keep-alive in seconds (`keep_alive_s`, default 30, 1..=65535).
    pub keep_alive_s: u16,
}

/// The line format of a serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SerialFormat {
    /// `surgard`: automation output of Sur-Gard-style receivers.
    Surgard,
    /// `contact-id`: raw 16-digit Contact ID messages, one per line.
    ContactId,
    /// `telecare-line`: the line protocol of dispersed units.
    TelecareLine,
}

impl SerialFormat {
    /// All formats, in the order the documentation lists them.
    pub const ALL: [SerialFormat; 3] = [
        SerialFormat::Surgard,
        SerialFormat::ContactId,
        SerialFormat::TelecareLine,
    ];

    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            SerialFormat::Surgard => "surgard",
            SerialFormat::ContactId => "contact-id",
            SerialFormat::TelecareLine => "telecare-line",
        }
    }

    /// The format with this configuration name.
    pub fn from_name(name: &str) -> Option<SerialFormat> {
        SerialFormat::ALL
            .into_iter()
            .find(|format| format.as_str() == name)
    }
}

impl fmt::Display for SerialFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SerialFormat {
    /// The line settings a port of this format has unless configured:
    /// receivers print at 9600 baud 8N1 (the MLR2000's default; an MLR2E is
    /// usually 19200 7E1), dispersed units talk at 115200 8N1.
    pub fn default_line(self) -> (u32, u8, Parity, u8) {
        match self {
            SerialFormat::Surgard | SerialFormat::ContactId => (9600, 8, Parity::None, 1),
            SerialFormat::TelecareLine => (115_200, 8, Parity::None, 1),
        }
    }
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// `[[serial]]`: one serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// Source id, unique among all sources (MQTT and serial).
    pub id: String,
    /// The device, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Line speed (default by format, see [`SerialFormat::default_line`]).
    pub baud: u32,
    /// Data bits, 5–8.
    pub data_bits: u8,
    pub parity: Parity,
    /// Stop bits, 1 or 2.
    pub stop_bits: u8,
    /// How lines are framed and decoded.
    pub format: SerialFormat,
    /// The tenant of signals no `map` entry names.
    pub tenant: String,
    /// A port down (unplugged, failing to open) for this long raises a
    /// `comms_fail` alarm; its return raises the restore
    /// (`comms_fail_after_s`, default 60).
    pub comms_fail_after: Duration,
    /// Which tenant and device a line belongs to, by receiver, line and
    /// account; the first entry that matches wins.
    pub map: Vec<SerialMapping>,
}

/// `[[serial.map]]`: lines whose receiver, line and account match (each
/// optional, at least one given) belong to this tenant and device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialMapping {
    pub receiver: Option<String>,
    pub line: Option<String>,
    /// The panel account, or the unit id on `telecare-line`.
    pub account: Option<String>,
    /// The tenant (default: the port's).
    pub tenant: Option<String>,
    /// The device id (default: the account or unit id).
    pub device_id: Option<String>,
}

impl SerialMapping {
    /// True when every field the entry gives matches.
    pub fn matches(&self, receiver: Option<&str>, line: Option<&str>, account: &str) -> bool {
        let field = |want: &Option<String>, have: Option<&str>| {
            want.as_deref().is_none_or(|w| Some(w) == have)
        };
        field(&self.receiver, receiver)
            && field(&self.line, line)
            && field(&self.account, Some(account))
    }
}

/// A secret from the configuration: an HMAC key, a bearer token, a password.
/// `Debug` and `Display` print `***`; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How alarms are delivered to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    /// `http`: signed webhooks (`POST {url}`).
    Http,
}

impl ProviderKind {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Http => "http",
        }
    }
}

/// `[[provider]]`: one monitoring provider (alarm receiving centre).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// Provider id, unique among providers.
    pub id: String,
    /// How alarms reach it (`kind`, default `http`).
    pub kind: ProviderKind,
    /// Where alarms are posted: `http` or `https` with a host.
    pub url: url::Url,
    /// HMAC key for `X-Telegate-Signature`.
    pub secret: Secret,
    /// Bearer token this provider presents on the progress API; no two
    /// providers share one.
    pub token: Secret,
    /// Limit of one delivery attempt (`timeout_s`, default 5, 1..=300).
    pub timeout: Duration,
}

/// One service level of a contract: `pct` percent of alarms answered within
/// `within_s` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AnswerTarget {
    /// At least 1.
    pub within_s: u32,
    /// In (0, 100].
    pub pct: f64,
}

impl AnswerTarget {
    /// The targets of a contract that names none: 97.5 % within 60 s and
    /// 99 % within 180 s.
    pub fn defaults() -> Vec<AnswerTarget> {
        vec![
            AnswerTarget {
                within_s: 60,
                pct: 97.5,
            },
            AnswerTarget {
                within_s: 180,
                pct: 99.0,
            },
        ]
    }
}

/// How long, counted from when an alarm was stored, a provider has to accept
/// it before the next provider in the chain is tried; one per priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverAfter {
    /// Priority 1 (default 10 s).
    pub critical: Duration,
    /// Priority 2 (default 30 s).
    pub urgent: Duration,
    /// Priority 3 (default 300 s).
    pub technical: Duration,
    /// Priority 4 (default 3600 s).
    pub routine: Duration,
}

impl FailoverAfter {
    /// The deadline for alarms of `priority`.
    pub fn for_priority(&self, priority: crate::model::Priority) -> Duration {
        use crate::model::Priority;
        match priority {
            Priority::Critical => self.critical,
            Priority::Urgent => self.urgent,
            Priority::Technical => self.technical,
            Priority::Routine => self.routine,
        }
    }
}

impl Default for FailoverAfter {
    fn default() -> Self {
        FailoverAfter {
            critical: Duration::from_secs(10),
            urgent: Duration::from_secs(30),
            technical: Duration::from_secs(300),
            routine: Duration::from_secs(3600),
        }
    }
}

/// `[[contract]]`: which provider serves which tenants, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct ContractConfig {
    /// Contract id, unique among contracts.
    pub id: String,
    /// The primary provider; a defined provider id.
    pub provider: String,
    /// Providers tried in order when the primary does not accept in time;
    /// defined, distinct, and not the primary.
    pub fallback: Vec<String>,
    /// The tenants covered; at least one, no repeats.
    pub tenants: Vec<String>,
    /// First day covered (inclusive, Europe/London).
    pub starts: NaiveDate,
    /// Last day covered (inclusive); not before `starts`.
    pub ends: NaiveDate,
    /// Service levels the SLA report checks.
    pub answer_targets: Vec<AnswerTarget>,
    /// Failover deadlines per priority.
    pub failover_after_s: FailoverAfter,
}

impl ContractConfig {
    /// Whether the contract is in force on `day`.
    pub fn covers_day(&self, day: NaiveDate) -> bool {
        self.starts <= day && day <= self.ends
    }
}

/// `[routing]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    /// Alarms that no contract covers go to this provider, flagged
    /// `uncontracted`; a defined provider id.
    pub default_provider: String,
}

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConfigProblem {
    /// Key path such as `provider[1].url`, `line 3, column 7` for a syntax
    /// error, or `(file)` for the file as a whole.
    pub path: String,
    /// What is wrong, for a person to read.
    pub message: String,
}

impl ConfigProblem {
    /// A problem at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
        ConfigProblem {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem of one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as it was named to the loader.
    pub file: String,
    /// The problems, at least one, in the order they were found.
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    /// One `FILE: key.path: message` line per problem.
    pub fn lines(&self) -> Vec<String> {
        self.problems
            .iter()
            .map(|problem| format!("{}: {problem}", self.file))
            .collect()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("\n"))
    }
}

impl std::error::Error for ConfigError {}

/// The one problem of a file that is not TOML, located by line and column.
fn syntax_problem(text: &str, err: &toml::de::Error) -> ConfigProblem {
    let message = err.message().trim_end().to_owned();
    match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            ConfigProblem::new(format!("line {line}, column {column}"), message)
        }
        None => ConfigProblem::new("(file)", message),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Where a problem belongs, for listing the problems of one table or array
/// element together, sections in the order of [`Config`]'s fields; within
/// one element the order in which they were found is kept.
fn location(path: &str) -> (usize, usize) {
    const SECTIONS: [&str; 8] = [
        "store", "api", "ingest", "mqtt", "serial", "provider", "contract", "routing",
    ];
    let end = path.find(['.', '[']).unwrap_or(path.len());
    let section = &path[..end];
    let rank = if path == "(file)" || path.starts_with("line ") {
        0
    } else {
        SECTIONS
            .iter()
            .position(|known| *known == section)
            .map_or(SECTIONS.len() + 1, |at| at + 1)
    };
    let index = path[end..]
        .strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(index, _)| index.parse().ok())
        .unwrap_or(0);
    (rank, index)
}

/// Removes repeated problems, keeping the first of each.
fn dedup_in_order(problems: &mut Vec<ConfigProblem>) {
    let mut seen = std::collections::HashSet::new();
    problems.retain(|problem| seen.insert(problem.clone()));
}

/// A URL with its password, if any, replaced by `***`; text that is not a
/// URL becomes `***` whole, since it may be a password itself.
pub fn redact_password(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) => {
            if url.password().is_some() && url.set_password(Some("***")).is_err() {
                return format!("{}://***", url.scheme());
            }
            url.to_string()
        }
        Err(_) => "***".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = r#"
        [[provider]]
        id = "arc-north"
        url = "https://arc-north.example/alarms"
        secret = "s"
        token = "t"

        [routing]
        default_provider = "arc-north"
    "#;

    #[test]
    fn defaults_fill_every_optional_key() {
        let config = Config::from_toml_str(MINIMAL, "minimal.toml", &no_env)
            .unwrap_or_else(|err| panic!("{err}"));
        // The loader's defaults and the Default impls must not drift apart.
        assert_eq!(config.store, StoreConfig::default());
        assert_eq!(config.api, ApiConfig::default());
        assert_eq!(config.ingest, IngestConfig::default());
        assert_eq!(
            config.store.url,
            StoreUrl::Sqlite(PathBuf::from("data/telegate.db"))
        );
        assert_eq!(config.api.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(
            config.ingest,
            IngestConfig {
                batch_max: 512,
                batch_wait: Duration::from_millis(2),
                commit_interval: Duration::from_millis(10),
                dedupe_window: Duration::from_secs(600),
                queue: 10_000,
            }
        );
        assert!(config.mqtt.is_empty());
        assert!(config.serial.is_empty());
        assert!(config.contracts.is_empty());
        let provider = config.provider("arc-north").expect("defined");
        assert_eq!(provider.kind, ProviderKind::Http);
        assert_eq!(provider.timeout, Duration::from_secs(5));
        assert_eq!(config.routing.default_provider, "arc-north");
        assert!(config.provider("arc-south").is_none());
    }

    #[test]
    fn contract_and_source_defaults() {
        let text = format!(
            r#"{MINIMAL}
            [[mqtt]]
            id = "devices"
            url = "mqtt://broker.example"
            client_id = "telegate-1"

            [[serial]]
            id = "receiver-1"
            path = "/dev/ttyUSB0"
            format = "contact-id"
            tenant = "derbyshire"

            [[contract]]
            id = "DCC-2026-AT"
            provider = "arc-north"
            tenants = ["derbyshire"]
            starts = 2026-04-01
            ends = "2027-03-31"
            failover_after_s = {{ critical = 5 }}
            "#
        );
        let config =
            Config::from_toml_str(&text, "t.toml", &no_env).unwrap_or_else(|err| panic!("{err}"));
        let mqtt = &config.mqtt[0];
        assert_eq!(mqtt.url.port, 1883);
        assert!(!mqtt.url.embedded);
        assert_eq!(mqtt.keep_alive_s, 30);
        assert_eq!(mqtt.shared_group, None);
        assert_eq!(config.serial[0].baud, 9600);
        assert_eq!(config.serial[0].format, SerialFormat::ContactId);
        let contract = &config.contracts[0];
        assert!(contract.fallback.is_empty());
        assert_eq!(contract.answer_targets, AnswerTarget::defaults());
        assert_eq!(
            contract.failover_after_s,
            FailoverAfter {
                critical: Duration::from_secs(5),
                ..FailoverAfter::default()
            }
        );
        assert_eq!(
            FailoverAfter::default(),
            FailoverAfter {
                critical: Duration::from_secs(10),
                urgent: Duration::from_secs(30),
                technical: Duration::from_secs(300),
                routine: Duration::from_secs(3600),
            }
        );
        let april = NaiveDate::from_ymd_opt(2026, 4, 1).expect("date");
        assert!(contract.covers_day(april));
        assert!(!contract.covers_day(april.pred_opt().expect("date")));
    }

    #[test]
    fn store_urls() {
        let with_store = |url: &str| {
            let text = format!("[store]\nurl = \"{url}\"\n{MINIMAL}");
            Config::from_toml_str(&text, "t.toml", &no_env).map(|config| config.store.url)
        };
        assert_eq!(
            with_store("sqlite:///tmp/x.db"),
            Ok(StoreUrl::Sqlite(PathBuf::from("/tmp/x.db")))
        );
        assert_eq!(
            with_store("postgresql://gate:pw@db.example/telegate"),
            Ok(StoreUrl::Postgres(
                "postgresql://gate:pw@db.example/telegate".to_owned()
            ))
        );
        assert!(with_store("mysql://db.example/telegate").is_err());
        assert!(with_store("sqlite://").is_err());
    }

    #[test]
    fn secrets_never_print() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(secret.expose(), "hunter2");
        let postgres = StoreUrl::Postgres("postgres://gate:hunter2@db.example/telegate".to_owned());
        assert!(!format!("{postgres:?}").contains("hunter2"));
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let err =
            Config::from_toml_str("a = 1\nb = = 2\n", "bad.toml", &no_env).expect_err("not TOML");
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].path, "line 2, column 5");
        assert!(err.lines()[0].starts_with("bad.toml: line 2, column 5: "));
    }

    #[test]
    fn line_columns_count_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 3), (2, 1));
        assert_eq!(line_column("ab\néd", 5), (2, 2));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn error_lines_name_file_and_path() {
        let err = ConfigError {
            file: "config/x.toml".to_owned(),
            problems: vec![
                ConfigProblem::new("routing.default_provider", "required"),
                ConfigProblem::new("provider", "at least one [[provider]] is required"),
            ],
        };
        assert_eq!(
            err.lines(),
            vec![
                "config/x.toml: routing.default_provider: required",
                "config/x.toml: provider: at least one [[provider]] is required",
            ]
        );
        assert_eq!(err.to_string(), err.lines().join("\n"));
    }
}
