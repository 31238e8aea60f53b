//! Phase 2: the raw structs become a [`Config`] whose invariants hold.
//!
//! Every check runs, whatever failed before it, so that one `telegate check`
//! lists every problem. Ids, tenants and references are named in messages;
//! secrets, URLs and wrongly typed values are not repeated, since they may
//! hold text substituted from the environment.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use chrono::NaiveDate;

use super::raw::{
    describe, RawAnswerTarget, RawApi, RawConfig, RawContract, RawDeliver, RawFailoverAfter,
    RawIngest, RawMqtt, RawProvider, RawRetention, RawSerial, RawSerialMap, RawStore,
};
use super::{
    AnswerTarget, ApiConfig, BrokerUrl, Config, ConfigProblem, ContractConfig, DeliverConfig,
    FailoverAfter, IngestConfig, MqttConfig, Parity, ProviderConfig, ProviderKind, RetentionConfig,
    RoutingConfig, Secret, SerialConfig, SerialFormat, SerialMapping, StoreConfig, StoreUrl,
};

/// Longest id, tenant, client id or group name.
const MAX_NAME: usize = 64;

/// Longest answer target: a day.
const MAX_WITHIN_S: i64 = 86_400;

/// Collects the problems of phase 2.
pub(super) struct Checker<'a> {
    /// Paths already reported in phase 1: nothing more is said about them
    /// or anything under them (a removed value is not also `required`).
    broken: &'a [String],
    problems: Vec<ConfigProblem>,
}

/// What the overlap check needs of a contract whose scope and dates are valid.
struct Scope {
    at: String,
    id: String,
    tenants: Vec<(usize, String)>,
    starts: NaiveDate,
    ends: NaiveDate,
}

impl<'a> Checker<'a> {
    pub(super) fn new(broken: &'a [String]) -> Checker<'a> {
        Checker {
            broken,
            problems: Vec::new(),
        }
    }

    pub(super) fn into_problems(self) -> Vec<ConfigProblem> {
        self.problems
    }

    /// The validated configuration; `None` when any problem was reported.
    pub(super) fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let store = self.store(raw.store);
        let api = self.api(raw.api);
        let ingest = self.ingest(raw.ingest);
        let deliver = self.deliver(raw.deliver);
        let retention = self.retention(raw.retention);

        let source_ids = raw
            .mqtt
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("mqtt[{i}]"), m.id.as_deref()))
            .chain(
                raw.serial
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (format!("serial[{i}]"), s.id.as_deref())),
            )
            .collect::<Vec<_>>();
        self.unique_ids("source", &source_ids);
        let mqtt = raw
            .mqtt
            .into_iter()
            .enumerate()
            .map(|(i, m)| self.mqtt(&format!("mqtt[{i}]"), m))
            .collect::<Vec<_>>();
        let serial = raw
            .serial
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.serial(&format!("serial[{i}]"), s))
            .collect::<Vec<_>>();

        if raw.provider.is_empty() {
            self.report("provider", "at least one [[provider]] is required");
        }
        let provider_ids = raw
            .provider
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("provider[{i}]"), p.id.as_deref()))
            .collect::<Vec<_>>();
        self.unique_ids("provider", &provider_ids);
        let defined: HashSet<String> = raw
            .provider
            .iter()
            .filter_map(|p| p.id.clone())
            .filter(|id| is_name(id))
            .collect();
        self.distinct_tokens(&raw.provider);
        let providers = raw
            .provider
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.provider(&format!("provider[{i}]"), p))
            .collect::<Vec<_>>();

        let contract_ids = raw
            .contract
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("contract[{i}]"), c.id.as_deref()))
            .collect::<Vec<_>>();
        self.unique_ids("contract", &contract_ids);
        let mut scopes = Vec::new();
        let contracts = raw
            .contract
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.contract(&format!("contract[{i}]"), c, &defined, &mut scopes))
            .collect::<Vec<_>>();
        self.no_overlaps(&scopes);

        let routing = self.routing(raw.routing.and_then(|r| r.default_provider), &defined);
        if let Some(deliver) = &deliver {
            self.lease_outlasts_attempts(deliver, &providers);
        }

        Some(Config {
            store: store?,
            api: api?,
            ingest: ingest?,
            deliver: deliver?,
            retention: retention?,
            mqtt: mqtt.into_iter().collect::<Option<_>>()?,
            serial: serial.into_iter().collect::<Option<_>>()?,
            providers: providers.into_iter().collect::<Option<_>>()?,
            contracts: contracts.into_iter().collect::<Option<_>>()?,
            routing: routing?,
        })
    }

    fn report(&mut self, path: &str, message: impl Into<String>) {
        if !self.is_broken(path) {
            self.problems.push(ConfigProblem::new(path, message));
        }
    }

    fn is_broken(&self, path: &str) -> bool {
        self.broken.iter().any(|broken| {
            path.strip_prefix(broken.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }

    fn required<T>(&mut self, path: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.report(path, "required");
        }
        value
    }

    /// An integer key with a default, checked against `min..=max`.
    fn int_in(
        &mut self,
        path: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let value = value.unwrap_or(default);
        if (min..=max).contains(&value) {
            Some(value)
        } else {
            if max == i64::MAX {
                self.report(path, format!("must be at least {min}"));
            } else {
                self.report(path, format!("must be between {min} and {max}"));
            }
            None
        }
    }

    fn seconds(
        &mut self,
        path: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Option<Duration> {
        let value = self.int_in(path, value, default, min, max)?;
        u64::try_from(value).ok().map(Duration::from_secs)
    }

    /// Checks an id, tenant or group name: 1–64 characters of `[A-Za-z0-9._-]`.
    fn name(&mut self, path: &str, value: String) -> Option<String> {
        if value.is_empty() {
            self.report(path, "must not be empty");
        } else if value.chars().count() > MAX_NAME {
            self.report(path, format!("must be at most {MAX_NAME} characters"));
        } else if !is_name(&value) {
            self.report(
                path,
                format!("{value:?} may only contain A-Z, a-z, 0-9, '.', '_' and '-'"),
            );
        } else {
            return Some(value);
        }
        None
    }

    fn required_name(&mut self, path: &str, value: Option<String>) -> Option<String> {
        let value = self.required(path, value)?;
        self.name(path, value)
    }

    fn secret(&mut self, path: &str, value: Option<String>) -> Option<Secret> {
        let value = self.required(path, value)?;
        if value.is_empty() {
            self.report(path, "must not be empty");
            return None;
        }
        Some(Secret(value))
    }

    /// Reports each id used a second time, at the later entry.
    fn unique_ids(&mut self, what: &str, entries: &[(String, Option<&str>)]) {
        let mut first: HashMap<&str, &str> = HashMap::new();
        for (at, id) in entries {
            let Some(id) = id.filter(|id| is_name(id)) else {
                continue;
            };
            match first.get(id) {
                Some(earlier) => {
                    let message = format!("duplicate {what} id {id:?} (first at {earlier})");
                    self.report(&format!("{at}.id"), message);
                }
                None => {
                    first.insert(id, at);
                }
            }
        }
    }

    /// Tokens identify providers on the progress API: no two may share one.
    fn distinct_tokens(&mut self, providers: &[RawProvider]) {
        let mut first: HashMap<&str, String> = HashMap::new();
        for (i, provider) in providers.iter().enumerate() {
            let Some(token) = provider.token.as_deref().filter(|t| !t.is_empty()) else {
                continue;
            };
            match first.get(token) {
                Some(earlier) => {
                    let message = format!("same token as {earlier}; each provider needs its own");
                    self.report(&format!("provider[{i}].token"), message);
                }
                None => {
                    let name = match provider.id.as_deref() {
                        Some(id) if is_name(id) => format!("provider {id:?}"),
                        _ => format!("provider[{i}]"),
                    };
                    first.insert(token, name);
                }
            }
        }
    }

    fn store(&mut self, raw: Option<RawStore>) -> Option<StoreConfig> {
        let Some(text) = raw.and_then(|store| store.url) else {
            return Some(StoreConfig::default());
        };
        let path = "store.url";
        if let Some(file) = text.strip_prefix("sqlite://") {
            if file.is_empty() {
                self.report(
                    path,
                    "sqlite:// needs a file path, like sqlite://data/telegate.db",
                );
                return None;
            }
            return Some(StoreConfig {
                url: StoreUrl::Sqlite(PathBuf::from(file)),
            });
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return match url::Url::parse(&text) {
                Ok(_) => Some(StoreConfig {
                    url: StoreUrl::Postgres(text),
                }),
                Err(err) => {
                    self.report(path, format!("not a valid PostgreSQL URL: {err}"));
                    None
                }
            };
        }
        self.report(path, "must start with sqlite:// or postgres://");
        None
    }

    fn api(&mut self, raw: Option<RawApi>) -> Option<ApiConfig> {
        let Some(text) = raw.and_then(|api| api.listen) else {
            return Some(ApiConfig::default());
        };
        match text.parse::<SocketAddr>() {
            Ok(listen) => Some(ApiConfig { listen }),
            Err(_) => {
                self.report("api.listen", "not a socket address like 127.0.0.1:8080");
                None
            }
        }
    }

    fn ingest(&mut self, raw: Option<RawIngest>) -> Option<IngestConfig> {
        let raw = raw.unwrap_or_default();
        let batch_max = self.int_in("ingest.batch_max", raw.batch_max, 512, 1, 10_000);
        let batch_wait = self.int_in("ingest.batch_wait_ms", raw.batch_wait_ms, 2, 0, 1000);
        let commit_interval = self.int_in(
            "ingest.commit_interval_ms",
            raw.commit_interval_ms,
            10,
            0,
            1000,
        );
        let dedupe = self.seconds(
            "ingest.dedupe_window_s",
            raw.dedupe_window_s,
            600,
            1,
            i64::MAX,
        );
        let queue = self.int_in("ingest.queue", raw.queue, 10_000, 1, i64::MAX);
        Some(IngestConfig {
            batch_max: usize::try_from(batch_max?).ok()?,
            batch_wait: Duration::from_millis(u64::try_from(batch_wait?).ok()?),
            commit_interval: Duration::from_millis(u64::try_from(commit_interval?).ok()?),
            dedupe_window: dedupe?,
            queue: usize::try_from(queue?).ok()?,
        })
    }

    fn retention(&mut self, raw: Option<RawRetention>) -> Option<RetentionConfig> {
        let raw = raw.unwrap_or_default();
        let days = self.int_in("retention.days", raw.days, 400, 0, 100_000);
        let batch = self.int_in("retention.batch", raw.batch, 500, 1, 10_000);
        let interval = self.int_in("retention.interval_s", raw.interval_s, 3600, 60, 86_400);
        let days = u64::try_from(days?).ok()?;
        Some(RetentionConfig {
            keep: (days > 0).then(|| Duration::from_secs(days * 86_400)),
            batch: u32::try_from(batch?).ok()?,
            interval: Duration::from_secs(u64::try_from(interval?).ok()?),
        })
    }

    fn deliver(&mut self, raw: Option<RawDeliver>) -> Option<DeliverConfig> {
        let raw = raw.unwrap_or_default();
        let defaults = DeliverConfig::default();
        let instance_id = match raw.instance_id {
            Some(id) => self.name("deliver.instance_id", id),
            None => Some(defaults.instance_id),
        };
        let lease = self.int_in("deliver.lease_s", raw.lease_s, 30, 5, 3600);
        let poll = self.int_in("deliver.poll_ms", raw.poll_ms, 200, 10, 10_000);
        let max_in_flight = self.int_in("deliver.max_in_flight", raw.max_in_flight, 32, 1, 1024);
        let claim_batch = self.int_in("deliver.claim_batch", raw.claim_batch, 256, 1, 10_000);
        Some(DeliverConfig {
            instance_id: instance_id?,
            lease: Duration::from_secs(u64::try_from(lease?).ok()?),
            poll: Duration::from_millis(u64::try_from(poll?).ok()?),
            max_in_flight: usize::try_from(max_in_flight?).ok()?,
            claim_batch: usize::try_from(claim_batch?).ok()?,
        })
    }

    /// A delivery attempt must end while its claim holds, or a second
    /// claim could deliver the same alarm at the same time.
    fn lease_outlasts_attempts(
        &mut self,
        deliver: &DeliverConfig,
        providers: &[Option<ProviderConfig>],
    ) {
        for (i, p) in providers.iter().enumerate() {
            if let Some(p) = p.as_ref().filter(|p| p.timeout >= deliver.lease) {
                self.report(
                    &format!("provider[{i}].timeout_s"),
                    format!(
                        "{} s is not shorter than deliver.lease_s ({} s): an attempt could outlast \
                         its claim and the alarm be delivered twice",
                        p.timeout.as_secs(),
                        deliver.lease.as_secs()
                    ),
                );
            }
        }
    }

    fn mqtt(&mut self, at: &str, raw: RawMqtt) -> Option<MqttConfig> {
        let id = self.required_name(&format!("{at}.id"), raw.id);
        let url_path = format!("{at}.url");
        let url = self
            .required(&url_path, raw.url)
            .and_then(|text| self.broker_url(&url_path, &text));
        let client_id = self.required_name(&format!("{at}.client_id"), raw.client_id);
        let shared_group = raw
            .shared_group
            .map(|group| self.name(&format!("{at}.shared_group"), group));
        let username_path = format!("{at}.username");
        let username = raw.username.map(|name| {
            if name.is_empty() {
                self.report(&username_path, "must not be empty");
                None
            } else {
                Some(name)
            }
        });
        if raw.password.is_some() && username.is_none() && !self.is_broken(&username_path) {
            self.report(&format!("{at}.password"), "a password needs a username");
        }
        let password = raw.password.map(Secret);
        let keep_alive = self.int_in(
            &format!("{at}.keep_alive_s"),
            raw.keep_alive_s,
            30,
            1,
            65_535,
        );
        Some(MqttConfig {
            id: id?,
            url: url?,
            client_id: client_id?,
            shared_group: present_and_valid(shared_group)?,
            username: present_and_valid(username)?,
            password,
            keep_alive_s: u16::try_from(keep_alive?).ok()?,
        })
    }

    /// `mqtt://host[:port]` (port 1883 by default) or `embedded://ip:port`.
    fn broker_url(&mut self, path: &str, text: &str) -> Option<BrokerUrl> {
        let problem = match parse_broker_url(text) {
            Ok(url) => return Some(url),
            Err(problem) => problem,
        };
        self.report(path, problem);
        None
    }

    fn serial(&mut self, at: &str, raw: RawSerial) -> Option<SerialConfig> {
        let id = self.required_name(&format!("{at}.id"), raw.id);
        let path_key = format!("{at}.path");
        let path = self.required(&path_key, raw.path).and_then(|path| {
            if path.is_empty() {
                self.report(&path_key, "must not be empty");
                None
            } else {
                Some(PathBuf::from(path))
            }
        });
        let format_path = format!("{at}.format");
        let format =
            self.required(&format_path, raw.format)
                .and_then(|name| match SerialFormat::from_name(&name) {
                    Some(format) => Some(format),
                    None => {
                        let message = format!(
                        "unknown format {name:?} (expected surgard, contact-id or telecare-line)"
                    );
                        self.report(&format_path, message);
                        None
                    }
                });
        let (baud, data_bits, parity, stop_bits) =
            format.unwrap_or(SerialFormat::Surgard).default_line();
        let baud = self.int_in(&format!("{at}.baud"), raw.baud, baud.into(), 50, 4_000_000);
        let data_bits = self.int_in(
            &format!("{at}.data_bits"),
            raw.data_bits,
            data_bits.into(),
            5,
            8,
        );
        let stop_bits = self.int_in(
            &format!("{at}.stop_bits"),
            raw.stop_bits,
            stop_bits.into(),
            1,
            2,
        );
        let parity_path = format!("{at}.parity");
        let parity = match raw.parity.as_deref() {
            None => Some(parity),
            Some("none") => Some(Parity::None),
            Some("even") => Some(Parity::Even),
            Some("odd") => Some(Parity::Odd),
            Some(other) => {
                self.report(
                    &parity_path,
                    format!("unknown parity {other:?} (expected none, even or odd)"),
                );
                None
            }
        };
        let tenant = self.required_name(&format!("{at}.tenant"), raw.tenant);
        let comms_fail_after = self.seconds(
            &format!("{at}.comms_fail_after_s"),
            raw.comms_fail_after_s,
            60,
            1,
            86_400,
        );
        let map = raw
            .map
            .into_iter()
            .enumerate()
            .map(|(i, m)| self.serial_map(&format!("{at}.map[{i}]"), m))
            .collect::<Vec<_>>();
        Some(SerialConfig {
            id: id?,
            path: path?,
            baud: u32::try_from(baud?).ok()?,
            data_bits: u8::try_from(data_bits?).ok()?,
            parity: parity?,
            stop_bits: u8::try_from(stop_bits?).ok()?,
            format: format?,
            tenant: tenant?,
            comms_fail_after: comms_fail_after?,
            map: map.into_iter().collect::<Option<_>>()?,
        })
    }

    fn serial_map(&mut self, at: &str, raw: RawSerialMap) -> Option<SerialMapping> {
        if raw.receiver.is_none() && raw.line.is_none() && raw.account.is_none() {
            self.report(
                at,
                "give at least one of receiver, line and account to match",
            );
            return None;
        }
        let mut text = |key: &str, value: Option<String>| match value {
            Some(v) if v.is_empty() || v.len() > MAX_NAME => {
                self.report(
                    &format!("{at}.{key}"),
                    format!("must be 1-{MAX_NAME} characters"),
                );
                Err(())
            }
            other => Ok(other),
        };
        let receiver = text("receiver", raw.receiver);
        let line = text("line", raw.line);
        let account = text("account", raw.account);
        let tenant = raw.tenant.map(|t| self.name(&format!("{at}.tenant"), t));
        let device_id = raw
            .device_id
            .map(|d| self.name(&format!("{at}.device_id"), d));
        Some(SerialMapping {
            receiver: receiver.ok()?,
            line: line.ok()?,
            account: account.ok()?,
            tenant: tenant.map_or(Some(None), |t| t.map(Some))?,
            device_id: device_id.map_or(Some(None), |d| d.map(Some))?,
        })
    }

    fn provider(&mut self, at: &str, raw: RawProvider) -> Option<ProviderConfig> {
        let id = self.required_name(&format!("{at}.id"), raw.id);
        let kind = match raw.kind.as_deref() {
            None | Some("http") => Some(ProviderKind::Http),
            Some(other) => {
                let message = format!("unknown kind {other:?} (expected http)");
                self.report(&format!("{at}.kind"), message);
                None
            }
        };
        let url_path = format!("{at}.url");
        let url =
            self.required(&url_path, raw.url)
                .and_then(|text| match parse_provider_url(&text) {
                    Ok(url) => Some(url),
                    Err(problem) => {
                        self.report(&url_path, problem);
                        None
                    }
                });
        let secret = self.secret(&format!("{at}.secret"), raw.secret);
        let token = self.secret(&format!("{at}.token"), raw.token);
        let timeout = self.seconds(&format!("{at}.timeout_s"), raw.timeout_s, 5, 1, 300);
        Some(ProviderConfig {
            id: id?,
            kind: kind?,
            url: url?,
            secret: secret?,
            token: token?,
            timeout: timeout?,
        })
    }

    fn contract(
        &mut self,
        at: &str,
        raw: RawContract,
        defined: &HashSet<String>,
        scopes: &mut Vec<Scope>,
    ) -> Option<ContractConfig> {
        let id = self.required_name(&format!("{at}.id"), raw.id);
        let provider_path = format!("{at}.provider");
        let provider = self
            .required(&provider_path, raw.provider)
            .and_then(|name| {
                if defined.contains(&name) {
                    Some(name)
                } else {
                    self.report(&provider_path, format!("unknown provider {name:?}"));
                    None
                }
            });
        let fallback = self.fallback(
            at,
            raw.fallback.unwrap_or_default(),
            provider.as_deref(),
            defined,
        );
        // The overlap check uses every well-formed tenant, even when the
        // list has other problems, so that those are not hidden.
        let scope_tenants = raw.tenants.as_ref().map(|tenants| {
            tenants
                .iter()
                .enumerate()
                .filter(|(k, tenant)| is_name(tenant) && !tenants[..*k].contains(tenant))
                .map(|(k, tenant)| (k, tenant.clone()))
                .collect::<Vec<_>>()
        });
        let tenants = self.tenants(at, raw.tenants);
        let starts = self.date(&format!("{at}.starts"), raw.starts);
        let ends = self.date(&format!("{at}.ends"), raw.ends);
        let dates = match (starts, ends) {
            (Some(starts), Some(ends)) if ends < starts => {
                let message = format!("ends {ends} is before starts {starts}");
                self.report(&format!("{at}.ends"), message);
                None
            }
            (Some(starts), Some(ends)) => Some((starts, ends)),
            _ => None,
        };
        if let (Some((starts, ends)), Some(tenants)) = (dates, scope_tenants) {
            scopes.push(Scope {
                at: at.to_owned(),
                id: id.clone().unwrap_or_else(|| at.to_owned()),
                tenants,
                starts,
                ends,
            });
        }
        let answer_targets = self.answer_targets(at, raw.answer_targets);
        let failover_after_s = self.failover_after(at, raw.failover_after_s);
        let (starts, ends) = dates?;
        Some(ContractConfig {
            id: id?,
            provider: provider?,
            fallback: fallback?,
            tenants: tenants?,
            starts,
            ends,
            answer_targets: answer_targets?,
            failover_after_s: failover_after_s?,
        })
    }

    fn fallback(
        &mut self,
        at: &str,
        names: Vec<String>,
        primary: Option<&str>,
        defined: &HashSet<String>,
    ) -> Option<Vec<String>> {
        let mut ok = true;
        for (k, name) in names.iter().enumerate() {
            let path = format!("{at}.fallback[{k}]");
            let message = if primary == Some(name.as_str()) {
                format!("repeats the primary provider {name:?}")
            } else if names[..k].contains(name) {
                format!("provider {name:?} is already earlier in the fallback list")
            } else if !defined.contains(name) {
                format!("unknown provider {name:?}")
            } else {
                continue;
            };
            self.report(&path, message);
            ok = false;
        }
        ok.then_some(names)
    }

    fn tenants(&mut self, at: &str, raw: Option<Vec<String>>) -> Option<Vec<String>> {
        let path = format!("{at}.tenants");
        let tenants = self.required(&path, raw)?;
        if tenants.is_empty() {
            self.report(&path, "must name at least one tenant");
            return None;
        }
        let mut ok = true;
        for (k, tenant) in tenants.iter().enumerate() {
            let tenant_path = format!("{path}[{k}]");
            if tenants[..k].contains(tenant) {
                self.report(&tenant_path, format!("tenant {tenant:?} is listed twice"));
                ok = false;
            } else if self.name(&tenant_path, tenant.clone()).is_none() {
                ok = false;
            }
        }
        ok.then_some(tenants)
    }

    fn date(&mut self, path: &str, value: Option<toml::Value>) -> Option<NaiveDate> {
        let value = self.required(path, value)?;
        match parse_date(&value) {
            Ok(date) => Some(date),
            Err(problem) => {
                self.report(path, problem);
                None
            }
        }
    }

    fn answer_targets(
        &mut self,
        at: &str,
        raw: Option<Vec<RawAnswerTarget>>,
    ) -> Option<Vec<AnswerTarget>> {
        let Some(raw) = raw else {
            return Some(AnswerTarget::defaults());
        };
        let path = format!("{at}.answer_targets");
        if raw.is_empty() {
            self.report(
                &path,
                "must list at least one target (leave the key out for the defaults)",
            );
            return None;
        }
        let targets = raw
            .into_iter()
            .enumerate()
            .map(|(k, target)| {
                let within_path = format!("{path}[{k}].within_s");
                let within_s = self
                    .required(&within_path, target.within_s)
                    .and_then(|s| self.int_in(&within_path, Some(s), 0, 1, MAX_WITHIN_S));
                let pct_path = format!("{path}[{k}].pct");
                let pct = self.required(&pct_path, target.pct).and_then(|pct| {
                    if pct > 0.0 && pct <= 100.0 {
                        Some(pct)
                    } else {
                        self.report(&pct_path, "must be more than 0 and at most 100");
                        None
                    }
                });
                Some(AnswerTarget {
                    within_s: u32::try_from(within_s?).ok()?,
                    pct: pct?,
                })
            })
            .collect::<Vec<_>>();
        targets.into_iter().collect()
    }

    fn failover_after(&mut self, at: &str, raw: Option<RawFailoverAfter>) -> Option<FailoverAfter> {
        let raw = raw.unwrap_or_default();
        let defaults = FailoverAfter::default();
        let mut one = |key: &str, value: Option<i64>, default: Duration| {
            let path = format!("{at}.failover_after_s.{key}");
            let default = i64::try_from(default.as_secs()).unwrap_or(i64::MAX);
            self.seconds(&path, value, default, 1, i64::MAX)
        };
        let critical = one("critical", raw.critical, defaults.critical);
        let urgent = one("urgent", raw.urgent, defaults.urgent);
        let technical = one("technical", raw.technical, defaults.technical);
        let routine = one("routine", raw.routine, defaults.routine);
        Some(FailoverAfter {
            critical: critical?,
            urgent: urgent?,
            technical: technical?,
            routine: routine?,
        })
    }

    /// Two contracts for one tenant on one day: reported on the later one.
    fn no_overlaps(&mut self, scopes: &[Scope]) {
        for (j, later) in scopes.iter().enumerate() {
            for earlier in &scopes[..j] {
                if !overlaps((earlier.starts, earlier.ends), (later.starts, later.ends)) {
                    continue;
                }
                for (k, tenant) in &later.tenants {
                    if earlier.tenants.iter().any(|(_, t)| t == tenant) {
                        let message = format!(
                            "tenant {tenant:?} is also covered by contract {:?} from {} to {}",
                            earlier.id, earlier.starts, earlier.ends
                        );
                        self.report(&format!("{}.tenants[{k}]", later.at), message);
                    }
                }
            }
        }
    }

    fn routing(
        &mut self,
        default_provider: Option<String>,
        defined: &HashSet<String>,
    ) -> Option<RoutingConfig> {
        let path = "routing.default_provider";
        let name = self.required(path, default_provider)?;
        if defined.contains(&name) {
            Some(RoutingConfig {
                default_provider: name,
            })
        } else {
            self.report(path, format!("unknown provider {name:?}"));
            None
        }
    }
}

/// An optional key that was checked: absent is fine, present must be valid.
fn present_and_valid<T>(checked: Option<Option<T>>) -> Option<Option<T>> {
    checked.map_or(Some(None), |value| value.map(Some))
}

/// 1–64 characters of `[A-Za-z0-9._-]`.
fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether two inclusive date ranges share at least one day.
fn overlaps(a: (NaiveDate, NaiveDate), b: (NaiveDate, NaiveDate)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// A TOML local date (`2026-04-01`) or a quoted one (`"2026-04-01"`).
fn parse_date(value: &toml::Value) -> Result<NaiveDate, String> {
    const EXPECTED: &str = "expected a date like 2026-04-01";
    match value {
        toml::Value::Datetime(datetime) => match (datetime.date, datetime.time, datetime.offset) {
            (Some(date), None, None) => NaiveDate::from_ymd_opt(
                i32::from(date.year),
                u32::from(date.month),
                u32::from(date.day),
            )
            .ok_or_else(|| format!("{EXPECTED}, found an impossible date")),
            _ => Err(format!("{EXPECTED}, found a date-time")),
        },
        toml::Value::String(text) => {
            let date = NaiveDate::parse_from_str(text, "%Y-%m-%d")
                .ok()
                .filter(|_| text.len() == 10);
            date.ok_or_else(|| format!("{EXPECTED}, found {text:?}"))
        }
        other => Err(format!("{EXPECTED}, found {}", describe(other))),
    }
}

fn parse_provider_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|err| format!("not a valid URL: {err}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme must be http or https, not {}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("URL has no host".to_owned());
    }
    Ok(url)
}

fn parse_broker_url(text: &str) -> Result<BrokerUrl, String> {
    let url = url::Url::parse(text).map_err(|err| format!("not a valid URL: {err}"))?;
    let embedded = match url.scheme() {
        "mqtt" => false,
        "embedded" => true,
        other => return Err(format!("scheme must be mqtt or embedded, not {other}")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials belong in username and password, not in the URL".to_owned());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err("must be SCHEME://HOST:PORT with nothing after the port".to_owned());
    }
    let Some(host) = url.host_str().filter(|host| !host.is_empty()) else {
        return Err("URL has no host".to_owned());
    };
    let host = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host)
        .to_owned();
    let port = match (url.port(), embedded) {
        (Some(0), _) => return Err("port must not be 0".to_owned()),
        (Some(port), _) => port,
        (None, false) => 1883,
        (None, true) => {
            return Err("embedded:// needs a port, like embedded://127.0.0.1:1883".to_owned())
        }
    };
    if embedded && host.parse::<IpAddr>().is_err() {
        return Err("the embedded broker needs an IP address to listen on".to_owned());
    }
    Ok(BrokerUrl {
        embedded,
        host,
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("test date")
    }

    fn value(toml_value: &str) -> toml::Value {
        let table: toml::Table = format!("v = {toml_value}").parse().expect("test TOML");
        table["v"].clone()
    }

    #[test]
    fn dates_in_both_forms() {
        assert_eq!(parse_date(&value("2026-04-01")), Ok(day("2026-04-01")));
        assert_eq!(parse_date(&value("\"2026-04-01\"")), Ok(day("2026-04-01")));
    }

    #[test]
    fn other_date_forms_are_errors() {
        for bad in [
            "\"2026-4-1\"",
            "\"01/04/2026\"",
            "\"2026-02-30\"",
            "\"\"",
            "\"2026-04-01T00:00:00\"",
            "2026-04-01T10:00:00",
            "2026-04-01T10:00:00Z",
            "10:00:00",
            "20260401",
            "[2026, 4, 1]",
        ] {
            assert!(parse_date(&value(bad)).is_err(), "{bad} should be rejected");
        }
        assert_eq!(
            parse_date(&value("20260401")),
            Err("expected a date like 2026-04-01, found an integer".to_owned())
        );
    }

    #[test]
    fn touching_ranges_do_not_overlap() {
        let march = (day("2025-04-01"), day("2026-03-31"));
        let april = (day("2026-04-01"), day("2027-03-31"));
        assert!(!overlaps(march, april));
        assert!(!overlaps(april, march));
    }

    #[test]
    fn sharing_one_day_overlaps() {
        let first = (day("2025-04-01"), day("2026-04-01"));
        let second = (day("2026-04-01"), day("2027-03-31"));
        assert!(overlaps(first, second));
        assert!(overlaps(second, first));
        let single = (day("2026-04-01"), day("2026-04-01"));
        assert!(overlaps(single, single));
    }

    #[test]
    fn containment_overlaps() {
        let outer = (day("2026-01-01"), day("2026-12-31"));
        let inner = (day("2026-06-01"), day("2026-06-30"));
        assert!(overlaps(outer, inner));
        assert!(overlaps(inner, outer));
    }

    #[test]
    fn names() {
        assert!(is_name("arc-north"));
        assert!(is_name("DCC-2026.AT_1"));
        assert!(is_name(&"a".repeat(64)));
        assert!(!is_name(&"a".repeat(65)));
        assert!(!is_name(""));
        assert!(!is_name("arc north"));
        assert!(!is_name("arc/north"));
        assert!(!is_name("é"));
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://broker.example"),
            Ok(BrokerUrl {
                embedded: false,
                host: "broker.example".to_owned(),
                port: 1883
            })
        );
        assert_eq!(
            parse_broker_url("embedded://127.0.0.1:18830"),
            Ok(BrokerUrl {
                embedded: true,
                host: "127.0.0.1".to_owned(),
                port: 18830
            })
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1884").map(|url| url.host),
            Ok("::1".to_owned())
        );
        for bad in [
            "embedded://127.0.0.1",
            "embedded://localhost:1883",
            "tcp://127.0.0.1:1883",
            "mqtt://user:pw@127.0.0.1:1883",
            "mqtt://127.0.0.1:1883/topic",
            "mqtt://127.0.0.1:0",
            "mqtt://",
            "127.0.0.1:1883",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn provider_urls() {
        assert!(parse_provider_url("https://arc.example/alarms").is_ok());
        assert!(parse_provider_url("http://127.0.0.1:9000/").is_ok());
        assert_eq!(
            parse_provider_url("ftp://arc.example/x").err(),
            Some("scheme must be http or https, not ftp".to_owned())
        );
        assert_eq!(
            parse_provider_url("not a url").err(),
            Some("not a valid URL: relative URL without a base".to_owned())
        );
    }
}
