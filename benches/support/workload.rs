//! What the ingest and store benches share: the signal they write (a pendant press with
//! a battery reading, from one of 500 devices, each with a sequence number
//! of its own), a router that sends every alarm to one provider, and the
//! runtime, with the gateway's two worker threads.

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::Utc;
use telegate::config::Config;
use telegate::model::{AlarmClass, AlarmDetails, DedupeKey, NewAlarm, SourceKind, SourceRef};
use telegate::route::Router;

static SEQ: AtomicU64 = AtomicU64::new(0);

pub fn alarm() -> NewAlarm {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let device = format!("dev-{}", seq % 500);
    let code = "1101".to_owned();
    NewAlarm {
        dedupe_key: DedupeKey::for_device_signal("bench", &device, seq, &code, false, None),
        tenant: "bench".into(),
        device_id: device,
        account: None,
        seq: Some(seq),
        class: AlarmClass::PersonalEmergency,
        restore: false,
        raised_at: None,
        received_at: Utc::now(),
        source: SourceRef {
            kind: SourceKind::Mqtt,
            id: "bench".into(),
            code,
        },
        details: AlarmDetails {
            battery_pct: Some(80),
            ..AlarmDetails::default()
        },
        raw: br#"{"seq":1,"cid":"1101","battery_pct":80}"#.to_vec(),
    }
}

/// Every alarm to the provider `arc`, whatever its tenant.
pub fn router() -> Router {
    let routing = Config::from_toml_str(
        "[[provider]]\nid = \"arc\"\nurl = \"http://127.0.0.1:9/a\"\nsecret = \"s\"\ntoken = \"t\"\n\
         [routing]\ndefault_provider = \"arc\"\n",
        "bench.toml",
        &|_| None,
    )
    .expect("bench config");
    Router::new(&routing)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}
