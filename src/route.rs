//! Routing: which provider chain an alarm goes to.
//!
//! A pure function of the configuration, the alarm's tenant and priority, and
//! the time it was received: the contract in force for the tenant on that
//! day (Europe/London, both ends inclusive) gives the primary provider, the
//! fallbacks and the failover deadline for the priority. When no contract is
//! in force the alarm goes to `routing.default_provider`, flagged
//! `uncontracted`, with the default deadlines.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Europe::London;

use crate::config::{Config, ContractConfig, FailoverAfter};
use crate::model::Priority;

/// Where one alarm is to be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The contract that covers the alarm; `None` when uncontracted.
    pub contract_id: Option<String>,
    /// Providers in the order they are tried: the primary, then fallbacks.
    /// Never empty.
    pub chain: Vec<String>,
    /// How long each provider in turn has, counted from when the alarm was
    /// stored, before the next one is tried.
    pub failover_after: Duration,
}

impl Route {
    /// True when no contract covers the alarm.
    pub fn uncontracted(&self) -> bool {
        self.contract_id.is_none()
    }
}

/// The contracts of a configuration, indexed for routing.
#[derive(Debug, Clone)]
pub struct Router {
    /// Per tenant, the contracts that cover it, sorted by start date. They
    /// never overlap (configuration validation guarantees it).
    by_tenant: HashMap<String, Vec<ContractConfig>>,
    default_provider: String,
    default_failover: FailoverAfter,
}

impl Router {
    pub fn new(config: &Config) -> Router {
        let mut by_tenant: HashMap<String, Vec<ContractConfig>> = HashMap::new();
        for contract in &config.contracts {
            for tenant in &contract.tenants {
                by_tenant
                    .entry(tenant.clone())
                    .or_default()
                    .push(contract.clone());
            }
        }
        for contracts in by_tenant.values_mut() {
            contracts.sort_by_key(|c| c.starts);
        }
        Router {
            by_tenant,
            default_provider: config.routing.default_provider.clone(),
            default_failover: FailoverAfter::default(),
        }
    }

    /// The contract in force for `tenant` on `day`.
    pub fn contract_on(&self, tenant: &str, day: NaiveDate) -> Option<&ContractConfig> {
        let contracts = self.by_tenant.get(tenant)?;
        // The last contract starting on or before the day is the only one
        // that can cover it.
        let idx = contracts.partition_point(|c| c.starts <= day);
        contracts[..idx].last().filter(|c| c.covers_day(day))
    }

    /// Routes an alarm of `tenant` and `priority` received at `at`.
    pub fn route(&self, tenant: &str, priority: Priority, at: DateTime<Utc>) -> Route {
        let day = at.with_timezone(&London).date_naive();
        match self.contract_on(tenant, day) {
            Some(contract) => Route {
                contract_id: Some(contract.id.clone()),
                chain: std::iter::once(&contract.provider)
                    .chain(&contract.fallback)
                    .cloned()
                    .collect(),
                failover_after: contract.failover_after_s.for_priority(priority),
            },
            None => Route {
                contract_id: None,
                chain: vec![self.default_provider.clone()],
                failover_after: self.default_failover.for_priority(priority),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_toml_str(
            r#"
[[provider]]
id = "north"
url = "http://127.0.0.1:1/a"
secret = "s1"
token = "t1"
[[provider]]
id = "south"
url = "http://127.0.0.1:1/b"
secret = "s2"
token = "t2"
[[provider]]
id = "spare"
url = "http://127.0.0.1:1/c"
secret = "s3"
token = "t3"
[[contract]]
id = "OLD"
provider = "south"
tenants = ["derbyshire"]
starts = 2025-04-01
ends = 2026-03-31
[[contract]]
id = "NEW"
provider = "north"
fallback = ["south", "spare"]
tenants = ["derbyshire", "notts"]
starts = 2026-04-01
ends = 2027-03-31
failover_after_s = { critical = 5, urgent = 20 }
[routing]
default_provider = "spare"
"#,
            "test.toml",
            &|_| None,
        )
        .expect("valid")
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_contract_in_force_on_the_day_gets_the_alarm() {
        let router = Router::new(&config());
        let r = router.route("derbyshire", Priority::Critical, at("2026-11-22T10:00:00Z"));
        assert_eq!(r.contract_id.as_deref(), Some("NEW"));
        assert_eq!(r.chain, ["north", "south", "spare"]);
        assert_eq!(r.failover_after, Duration::from_secs(5));
        assert!(!r.uncontracted());
        let r = router.route(
            "derbyshire",
            Priority::Technical,
            at("2025-06-01T10:00:00Z"),
        );
        assert_eq!(r.contract_id.as_deref(), Some("OLD"));
        assert_eq!(r.chain, ["south"]);
        assert_eq!(
            r.failover_after,
            Duration::from_secs(300),
            "default deadline"
        );
    }

    #[test]
    fn both_ends_are_inclusive_in_london_time() {
        let router = Router::new(&config());
        // 23:30 UTC on 31 March 2026 is 00:30 BST on 1 April: the new contract.
        let r = router.route("derbyshire", Priority::Urgent, at("2026-03-31T23:30:00Z"));
        assert_eq!(r.contract_id.as_deref(), Some("NEW"));
        // 22:30 UTC on 31 March is still 31 March in London: the old one's last day.
        let r = router.route("derbyshire", Priority::Urgent, at("2026-03-31T22:30:00Z"));
        assert_eq!(r.contract_id.as_deref(), Some("OLD"));
        // The last day of the new contract, late evening in winter (GMT).
        let r = router.route("notts", Priority::Urgent, at("2027-03-31T22:59:59Z"));
        assert_eq!(r.contract_id.as_deref(), Some("NEW"));
        assert_eq!(r.failover_after, Duration::from_secs(20));
    }

    #[test]
    fn uncovered_alarms_go_to_the_default_provider() {
        let router = Router::new(&config());
        for (tenant, when) in [
            ("nowhere", "2026-11-22T10:00:00Z"),
            ("notts", "2026-03-31T12:00:00Z"), // before its contract
            ("notts", "2027-04-01T00:30:00+01:00"), // after it expired
            ("derbyshire", "2024-01-01T00:00:00Z"),
        ] {
            let r = router.route(tenant, Priority::Critical, at(when));
            assert_eq!(r.contract_id, None, "{tenant} {when}");
            assert!(r.uncontracted());
            assert_eq!(r.chain, ["spare"]);
            assert_eq!(r.failover_after, Duration::from_secs(10));
        }
    }
}
