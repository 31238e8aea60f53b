//! Configuration checking through the public interfaces: the library's
//! loader on every file under `config/`, and `telegate check` as a user runs
//! it (exit status 64 and one `FILE: key.path: message` line per problem).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use telegate::config::{Config, ConfigError, StoreUrl};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// The environment variables `config/telegate.example.toml` needs.
const EXAMPLE_VARS: [(&str, &str); 4] = [
    ("ARC_NORTH_SECRET", "north-secret-value"),
    ("ARC_NORTH_TOKEN", "north-token-value"),
    ("ARC_SOUTH_SECRET", "south-secret-value"),
    ("ARC_SOUTH_TOKEN", "south-token-value"),
];

/// Every file under `config/invalid/` and exactly the problems it must give.
const INVALID: &[(&str, &[(&str, &str)])] = &[
    (
        "unknown-provider.toml",
        &[
            ("contract[0].provider", "unknown provider \"arc-nowhere\""),
            ("contract[0].fallback[1]", "unknown provider \"arc-elsewhere\""),
        ],
    ),
    (
        "ends-before-starts.toml",
        &[("contract[0].ends", "ends 2026-03-31 is before starts 2026-04-01")],
    ),
    (
        "duplicate-ids.toml",
        &[
            (
                "provider[1].id",
                "duplicate provider id \"arc-north\" (first at provider[0])",
            ),
            (
                "contract[1].id",
                "duplicate contract id \"CC-2026\" (first at contract[0])",
            ),
        ],
    ),
    (
        "overlapping-contracts.toml",
        &[(
            "contract[1].tenants[1]",
            "tenant \"derbyshire\" is also covered by contract \"DCC-2025-AT\" from 2025-04-01 to 2026-04-01",
        )],
    ),
    (
        "unset-variable.toml",
        &[(
            "provider[0].secret",
            "environment variable TELEGATE_SURELY_UNSET_VAR is not set",
        )],
    ),
    (
        "bad-url.toml",
        &[
            (
                "provider[0].url",
                "not a valid URL: relative URL without a base",
            ),
            ("provider[1].url", "scheme must be http or https, not ftp"),
        ],
    ),
    (
        "missing-default-provider.toml",
        &[("routing.default_provider", "required")],
    ),
    (
        "unknown-key.toml",
        &[("store.urll", "unknown key"), ("telemetry", "unknown key")],
    ),
    (
        "bad-types.toml",
        &[
            ("serial[0].baud", "expected an integer, found a string"),
            ("provider[0].timeout_s", "expected an integer, found a string"),
        ],
    ),
    (
        "bad-serial.toml",
        &[
            ("serial[0].data_bits", "must be between 5 and 8"),
            ("serial[0].stop_bits", "must be between 1 and 2"),
            (
                "serial[0].parity",
                "unknown parity \"mark\" (expected none, even or odd)",
            ),
            ("serial[0].comms_fail_after_s", "must be between 1 and 86400"),
            (
                "serial[0].map[0]",
                "give at least one of receiver, line and account to match",
            ),
            (
                "serial[0].map[1].device_id",
                "\"flat 12\" may only contain A-Z, a-z, 0-9, '.', '_' and '-'",
            ),
        ],
    ),
    (
        "lease-too-short.toml",
        &[(
            "provider[0].timeout_s",
            "10 s is not shorter than deliver.lease_s (10 s): an attempt could outlast its claim \
             and the alarm be delivered twice",
        )],
    ),
    (
        "syntax-error.toml",
        &[("line 4, column 49", "invalid basic string")],
    ),
];

fn read(relative: &str) -> String {
    let path = Path::new(MANIFEST_DIR).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn example_env(name: &str) -> Option<String> {
    EXAMPLE_VARS
        .iter()
        .find(|(var, _)| *var == name)
        .map(|(_, value)| (*value).to_owned())
}

fn load_invalid(name: &str) -> ConfigError {
    let file = format!("config/invalid/{name}");
    match Config::from_toml_str(&read(&file), &file, &no_env) {
        Ok(_) => panic!("{file} was accepted"),
        Err(err) => err,
    }
}

fn expected_lines(name: &str, problems: &[(&str, &str)]) -> BTreeSet<String> {
    problems
        .iter()
        .map(|(path, message)| format!("config/invalid/{name}: {path}: {message}"))
        .collect()
}

fn check(relative: &str, vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_telegate"));
    command
        .args(["check", "-c", relative])
        .current_dir(MANIFEST_DIR);
    for (name, _) in EXAMPLE_VARS {
        command.env_remove(name);
    }
    command.envs(vars.iter().copied());
    command
        .output()
        .unwrap_or_else(|err| panic!("cannot run telegate: {err}"))
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_invalid_file_gives_exactly_its_problems() {
    for (name, problems) in INVALID {
        let err = load_invalid(name);
        let found: BTreeSet<(String, String)> = err
            .problems
            .iter()
            .map(|problem| (problem.path.clone(), problem.message.clone()))
            .collect();
        let expected: BTreeSet<(String, String)> = problems
            .iter()
            .map(|(path, message)| ((*path).to_owned(), (*message).to_owned()))
            .collect();
        assert_eq!(found, expected, "problems of config/invalid/{name}");
        assert_eq!(
            err.problems.len(),
            problems.len(),
            "config/invalid/{name} repeats a problem"
        );
        assert_eq!(
            err.lines().into_iter().collect::<BTreeSet<_>>(),
            expected_lines(name, problems)
        );
    }
}

#[test]
fn every_invalid_file_has_expectations() {
    let dir = PathBuf::from(MANIFEST_DIR).join("config/invalid");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()));
    let on_disk: BTreeSet<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".toml"))
        .collect();
    let listed: BTreeSet<String> = INVALID.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(on_disk, listed);
}

#[test]
fn valid_files_load_without_environment() {
    for file in [
        "config/valid/minimal.toml",
        "config/valid/embedded.toml",
        "config/valid/serial.toml",
    ] {
        if let Err(err) = Config::from_toml_str(&read(file), file, &no_env) {
            panic!("{file} was rejected:\n{err}");
        }
    }
}

#[test]
fn embedded_file_has_what_the_demo_needs() {
    let file = "config/valid/embedded.toml";
    let config =
        Config::from_toml_str(&read(file), file, &no_env).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(
        config.store.url,
        StoreUrl::Sqlite(PathBuf::from("data/embedded.db"))
    );
    assert_eq!(config.mqtt.len(), 1);
    assert!(config.mqtt[0].url.embedded);
    assert_eq!(config.mqtt[0].url.host, "127.0.0.1");
    assert_eq!(config.mqtt[0].url.port, 18830);
    assert_eq!(config.providers.len(), 2);
    assert_eq!(config.contracts.len(), 2);
    let tenants: BTreeSet<&str> = config
        .contracts
        .iter()
        .flat_map(|contract| contract.tenants.iter().map(String::as_str))
        .collect();
    assert_eq!(tenants, BTreeSet::from(["derbyshire", "nottingham"]));
    for contract in &config.contracts {
        assert!(config.provider(&contract.provider).is_some());
    }
    assert!(config.provider(&config.routing.default_provider).is_some());
}

#[test]
fn example_loads_with_its_variables() {
    let file = "config/telegate.example.toml";
    let config = Config::from_toml_str(&read(file), file, &example_env)
        .unwrap_or_else(|err| panic!("{file} was rejected:\n{err}"));
    let north = config.provider("arc-north").expect("arc-north is defined");
    assert_eq!(north.secret.expose(), "north-secret-value");
    assert_eq!(north.token.expose(), "north-token-value");
    assert!(!format!("{config:?}").contains("secret-value"));
    assert_eq!(config.contracts[0].fallback, vec!["arc-south".to_owned()]);
    assert_eq!(config.routing.default_provider, "arc-north");
    assert!(
        config.serial.is_empty(),
        "the example's serial entry is commented out"
    );
    assert_eq!(config.deliver.max_in_flight, 32);
}

#[test]
fn check_reports_invalid_files_and_exits_64() {
    for name in [
        "unknown-provider.toml",
        "duplicate-ids.toml",
        "bad-types.toml",
        "unknown-key.toml",
        "syntax-error.toml",
    ] {
        let file = format!("config/invalid/{name}");
        let output = check(&file, &[]);
        assert_eq!(output.status.code(), Some(64), "exit status for {file}");
        let lines = stderr_lines(&output);
        assert!(!lines.is_empty(), "no problems printed for {file}");
        for line in &lines {
            let rest = line
                .strip_prefix(&format!("{file}: "))
                .unwrap_or_else(|| panic!("{line:?} does not start with the file"));
            let (path, message) = rest
                .split_once(": ")
                .unwrap_or_else(|| panic!("{line:?} is not FILE: key.path: message"));
            assert!(!path.is_empty() && !message.is_empty(), "{line:?}");
        }
        let problems = INVALID
            .iter()
            .find(|(listed, _)| *listed == name)
            .map_or(&[][..], |(_, problems)| problems);
        assert_eq!(
            lines.into_iter().collect::<BTreeSet<_>>(),
            expected_lines(name, problems)
        );
    }
}

#[test]
fn check_accepts_the_minimal_file() {
    let output = check("config/valid/minimal.toml", &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_accepts_the_example_with_its_variables() {
    let output = check("config/telegate.example.toml", &EXAMPLE_VARS);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_names_each_unset_variable_of_the_example() {
    let output = check("config/telegate.example.toml", &[]);
    assert_eq!(output.status.code(), Some(64));
    let expected: BTreeSet<String> = [
        ("provider[0].secret", "ARC_NORTH_SECRET"),
        ("provider[0].token", "ARC_NORTH_TOKEN"),
        ("provider[1].secret", "ARC_SOUTH_SECRET"),
        ("provider[1].token", "ARC_SOUTH_TOKEN"),
    ]
    .iter()
    .map(|(path, var)| {
        format!("config/telegate.example.toml: {path}: environment variable {var} is not set")
    })
    .collect();
    assert_eq!(
        stderr_lines(&output).into_iter().collect::<BTreeSet<_>>(),
        expected
    );
}

#[test]
fn check_reports_an_unreadable_file() {
    let output = check("config/invalid/no-such-file.toml", &[]);
    assert_eq!(output.status.code(), Some(64));
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("config/invalid/no-such-file.toml: (file): cannot read: "),
        "{lines:?}"
    );
}

#[test]
fn serial_ports_get_their_formats_line_settings_unless_given() {
    use telegate::config::{Parity, SerialFormat};
    let file = "config/valid/serial.toml";
    let config =
        Config::from_toml_str(&read(file), file, &no_env).unwrap_or_else(|err| panic!("{err}"));
    let [rx, dialler, hub] = config.serial.as_slice() else {
        panic!("three ports")
    };
    assert_eq!(rx.format, SerialFormat::Surgard);
    assert_eq!(
        (rx.baud, rx.data_bits, rx.parity, rx.stop_bits),
        (19200, 7, Parity::Even, 1)
    );
    assert_eq!(
        (dialler.baud, dialler.data_bits, dialler.parity),
        (9600, 8, Parity::None)
    );
    assert_eq!(dialler.comms_fail_after, Duration::from_secs(300));
    assert_eq!(hub.baud, 115_200);
    assert_eq!(hub.comms_fail_after, Duration::from_secs(60));
    assert_eq!(rx.map.len(), 2);
    assert!(rx.map[0].matches(Some("01"), Some("2"), "9999"));
    assert!(!rx.map[0].matches(Some("01"), Some("1"), "9999"));
    assert!(rx.map[1].matches(Some("03"), None, "1234"));
    assert_eq!(rx.map[1].device_id.as_deref(), Some("flat-12-pendant"));
}
