//! Routing is a pure function on the hot path of every commit: routes per
//! second against 1,000 contracts (500 tenants, each with an expired and a
//! current contract), for contracted and uncontracted tenants.
//!
//! `cargo bench --bench route`

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use telegate::config::Config;
use telegate::model::Priority;
use telegate::route::Router;

fn config(tenants: usize) -> Config {
    let mut toml = String::new();
    for p in ["north", "south"] {
        let _ = write!(
            toml,
            "[[provider]]\nid = \"{p}\"\nurl = \"http://127.0.0.1:9/{p}\"\nsecret = \"s-{p}\"\ntoken = \"t-{p}\"\n"
        );
    }
    for t in 0..tenants {
        for (n, starts, ends) in [
            ("OLD", "2024-04-01", "2026-03-31"),
            ("NEW", "2026-04-01", "2028-03-31"),
        ] {
            let _ = write!(
                toml,
                "[[contract]]\nid = \"{n}-{t}\"\nprovider = \"north\"\nfallback = [\"south\"]\n\
                 tenants = [\"tenant-{t}\"]\nstarts = {starts}\nends = {ends}\n"
            );
        }
    }
    toml.push_str("[routing]\ndefault_provider = \"south\"\n");
    Config::from_toml_str(&toml, "bench.toml", &|_| None).expect("bench config is valid")
}

fn bench_route(c: &mut Criterion) {
    let config = config(500);
    assert_eq!(config.contracts.len(), 1_000);
    let router = Router::new(&config);
    let at: DateTime<Utc> = "2026-11-22T10:15:30Z".parse().expect("time");
    let tenants: Vec<String> = (0..1_000).map(|t| format!("tenant-{t}")).collect();
    let mut group = c.benchmark_group("route_1000_contracts");
    group.throughput(Throughput::Elements(tenants.len() as u64));
    group.bench_function("mixed_tenants", |b| {
        b.iter(|| {
            for tenant in &tenants {
                black_box(router.route(black_box(tenant), Priority::Critical, at));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, bench_route);
criterion_main!(benches);
