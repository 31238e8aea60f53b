//! Service levels, computed from the stored stage timestamps only
//! (guarantee 5). Pure functions over rows the store hands out.
//!
//! Per contract: how many alarms it covered, how many a provider accepted,
//! how many went to a fallback provider, the delivery latency (received →
//! accepted by a provider) at the median and the 99th percentile, and for
//! each answer target the share of the contract's alarms an operator
//! answered within that many seconds of the alarm being received. An alarm
//! never answered counts as not answered in time.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::ContractConfig;

/// What the SLA computation needs of one alarm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlaRow {
    /// `None` for an alarm no contract covered.
    pub contract_id: Option<String>,
    pub received_at: DateTime<Utc>,
    pub accepted_at: Option<DateTime<Utc>>,
    /// True when a provider other than the primary accepted it.
    pub by_fallback: bool,
    pub answered_at: Option<DateTime<Utc>>,
}

/// One answer target and how the contract did against it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetResult {
    pub within_s: u32,
    /// The share the contract requires, in percent.
    pub required_pct: f64,
    /// The share achieved, in percent; `None` with no alarms.
    pub achieved_pct: Option<f64>,
}

impl TargetResult {
    /// Met when the share achieved reaches the share required (or there
    /// was nothing to answer).
    pub fn met(&self) -> bool {
        self.achieved_pct.is_none_or(|a| a >= self.required_pct)
    }
}

/// The service levels of one contract (or of the uncontracted alarms).
#[derive(Debug, Clone, PartialEq)]
pub struct ContractSla {
    /// `None` for the alarms no contract covered.
    pub contract_id: Option<String>,
    pub alarms: u64,
    pub delivered: u64,
    pub failovers: u64,
    /// Received → accepted by a provider, in milliseconds.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub targets: Vec<TargetResult>,
}

/// Computes every contract's service levels from `rows`. Contracts appear
/// in configuration order (each, even with no alarms), then the
/// uncontracted alarms when there are any. Rows of contracts not in
/// `contracts` (since removed from the configuration) get a line of their
/// own, without targets.
pub fn compute(rows: &[SlaRow], contracts: &[ContractConfig]) -> Vec<ContractSla> {
    let mut groups: BTreeMap<Option<&str>, Vec<&SlaRow>> = BTreeMap::new();
    for row in rows {
        groups
            .entry(row.contract_id.as_deref())
            .or_default()
            .push(row);
    }
    let mut out = Vec::new();
    for contract in contracts {
        let rows = groups
            .remove(&Some(contract.id.as_str()))
            .unwrap_or_default();
        let targets: Vec<(u32, f64)> = contract
            .answer_targets
            .iter()
            .map(|t| (t.within_s, t.pct))
            .collect();
        out.push(summarise(Some(contract.id.clone()), &rows, &targets));
    }
    let uncontracted = groups.remove(&None);
    for (id, rows) in groups {
        out.push(summarise(id.map(str::to_owned), &rows, &[]));
    }
    if let Some(rows) = uncontracted {
        out.push(summarise(None, &rows, &[]));
    }
    out
}

fn summarise(contract_id: Option<String>, rows: &[&SlaRow], targets: &[(u32, f64)]) -> ContractSla {
    let mut latencies: Vec<i64> = rows
        .iter()
        .filter_map(|r| {
            r.accepted_at
                .map(|a| (a - r.received_at).num_milliseconds().max(0))
        })
        .collect();
    latencies.sort_unstable();
    let answered: Vec<i64> = rows
        .iter()
        .filter_map(|r| {
            r.answered_at
                .map(|a| (a - r.received_at).num_milliseconds().max(0))
        })
        .collect();
    let targets = targets
        .iter()
        .map(|&(within_s, required_pct)| {
            let limit = i64::from(within_s) * 1000;
            let achieved_pct = (!rows.is_empty()).then(|| {
                answered.iter().filter(|&&ms| ms <= limit).count() as f64 * 100.0
                    / rows.len() as f64
            });
            TargetResult {
                within_s,
                required_pct,
                achieved_pct,
            }
        })
        .collect();
    ContractSla {
        contract_id,
        alarms: rows.len() as u64,
        delivered: latencies.len() as u64,
        failovers: rows
            .iter()
            .filter(|r| r.accepted_at.is_some() && r.by_fallback)
            .count() as u64,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        targets,
    }
}

/// The nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[i64], pct: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((pct / 100.0) * sorted.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted.len()) - 1;
    Some(sorted[idx] as f64)
}

/// The SLA table as aligned text, one contract a line.
pub fn render_table(slas: &[ContractSla]) -> String {
    let mut lines = vec![format!(
        "{:<18} {:>7} {:>9} {:>9} {:>9} {:>9}  answered within target",
        "contract", "alarms", "delivered", "failovers", "p50_ms", "p99_ms"
    )];
    for s in slas {
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let targets: Vec<String> = s
            .targets
            .iter()
            .map(|t| {
                let achieved = t
                    .achieved_pct
                    .map_or("-".to_owned(), |a| format!("{a:.1}%"));
                let verdict = if t.met() { "met" } else { "MISSED" };
                format!(
                    "{}s: {achieved} of {:.1}% {verdict}",
                    t.within_s, t.required_pct
                )
            })
            .collect();
        lines.push(format!(
            "{:<18} {:>7} {:>9} {:>9} {:>9} {:>9}  {}",
            s.contract_id.as_deref().unwrap_or("(uncontracted)"),
            s.alarms,
            s.delivered,
            s.failovers,
            ms(s.p50_ms),
            ms(s.p99_ms),
            if targets.is_empty() {
                "-".to_owned()
            } else {
                targets.join(", ")
            }
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AnswerTarget, FailoverAfter};

    fn contract(id: &str) -> ContractConfig {
        ContractConfig {
            id: id.into(),
            provider: "p".into(),
            fallback: vec![],
            tenants: vec!["t".into()],
            starts: chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
            ends: chrono::NaiveDate::from_ymd_opt(2026, 12, 31).unwrap(),
            answer_targets: vec![
                AnswerTarget {
                    within_s: 60,
                    pct: 97.5,
                },
                AnswerTarget {
                    within_s: 180,
                    pct: 99.0,
                },
            ],
            failover_after_s: FailoverAfter::default(),
        }
    }

    fn row(
        contract: Option<&str>,
        accepted_ms: Option<i64>,
        answered_s: Option<i64>,
        by_fallback: bool,
    ) -> SlaRow {
        let received = DateTime::<Utc>::from_timestamp(1_790_000_000, 0).unwrap();
        SlaRow {
            contract_id: contract.map(str::to_owned),
            received_at: received,
            accepted_at: accepted_ms.map(|ms| received + chrono::Duration::milliseconds(ms)),
            by_fallback,
            answered_at: answered_s.map(|s| received + chrono::Duration::seconds(s)),
        }
    }

    #[test]
    fn answer_targets_count_unanswered_alarms_as_late() {
        let mut rows: Vec<SlaRow> = (0..97)
            .map(|i| row(Some("A"), Some(10 + i), Some(30), false))
            .collect();
        rows.push(row(Some("A"), Some(5000), Some(120), true)); // answered late for 60 s
        rows.push(row(Some("A"), Some(20), Some(200), false)); // late for both
        rows.push(row(Some("A"), None, None, false)); // never delivered nor answered
        let slas = compute(&rows, &[contract("A"), contract("B")]);
        let a = &slas[0];
        assert_eq!((a.alarms, a.delivered, a.failovers), (100, 99, 1));
        assert_eq!(a.targets[0].achieved_pct, Some(97.0));
        assert!(!a.targets[0].met(), "97.0 % < 97.5 %");
        assert_eq!(a.targets[1].achieved_pct, Some(98.0));
        assert!(!a.targets[1].met());
        assert_eq!(a.p99_ms, Some(5000.0));
        let b = &slas[1];
        assert_eq!((b.alarms, b.delivered), (0, 0));
        assert!(b.targets.iter().all(TargetResult::met), "nothing to answer");
        assert_eq!(b.p50_ms, None);
    }

    #[test]
    fn uncontracted_alarms_come_last() {
        let rows = vec![
            row(None, Some(5), None, false),
            row(Some("A"), Some(7), Some(1), false),
        ];
        let slas = compute(&rows, &[contract("A")]);
        assert_eq!(slas.len(), 2);
        assert_eq!(slas[1].contract_id, None);
        assert_eq!(slas[1].alarms, 1);
        assert!(render_table(&slas).contains("(uncontracted)"));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[7], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
