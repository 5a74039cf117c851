//! The sample configurations shipped in `tuning/` (installed by the apply
//! scripts as the operator's starting point) must list every config key and
//! must load with the server's own loader.
//!
//! A key added to [`Config`] later fails this test until it is written into
//! both samples with its meaning, unit and default.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tern::cluster::ClusterConfig;
use tern::config::Config;

/// Every key of the configuration, optional ones included: the default
/// `Config` serialised, where an unset option still names its key. The keys
/// of an optional table (`[cluster]`) are named `table.key`, taken from the
/// table filled with only its required keys, so its defaulted keys count too.
fn all_keys() -> BTreeSet<String> {
    let value = serde_json::to_value(Config::default()).expect("config serialises");
    let mut keys: BTreeSet<String> = value
        .as_object()
        .expect("config is a table")
        .keys()
        .cloned()
        .collect();
    let cluster: ClusterConfig = toml::from_str(
        "node_id = \"a\"\nnats_urls = [\"nats://127.0.0.1:4222\"]\npublic_addr = \"a:1\"",
    )
    .expect("the required cluster keys suffice");
    let table = serde_json::to_value(cluster).expect("cluster config serialises");
    for key in table.as_object().expect("cluster config is a table").keys() {
        keys.insert(format!("cluster.{key}"));
    }
    keys
}

/// A `# [table]` line: the name of an optional table shown commented out.
fn commented_table(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?.trim_start();
    let name = rest.strip_prefix('[')?.strip_suffix(']')?;
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(name)
}

/// The keys TOML output of the default `Config` has (options without a
/// default value are left out).
fn default_keys() -> BTreeSet<String> {
    toml::from_str::<toml::Table>(&Config::default().to_toml())
        .expect("default config is TOML")
        .keys()
        .cloned()
        .collect()
}

/// A `# key = value` line: the key of an option shown commented out.
fn commented_key(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?.trim_start();
    let (key, _) = rest.split_once(" = ")?;
    (!key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')).then_some(key)
}

struct Sample {
    path: PathBuf,
    text: String,
}

impl Sample {
    fn read(relative: &str) -> Sample {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Sample { path, text }
    }

    /// Keys set in the file.
    fn active_keys(&self) -> BTreeSet<String> {
        toml::from_str::<toml::Table>(&self.text)
            .unwrap_or_else(|e| panic!("{}: not TOML: {e}", self.path.display()))
            .keys()
            .cloned()
            .collect()
    }

    /// Keys shown commented out, each with its line number; a commented
    /// `# [table]` counts as the key `table`, and the keys after it as
    /// `table.key` (such a table must come last in the file).
    fn commented_keys(&self) -> Vec<(usize, String)> {
        let mut table: Option<&str> = None;
        let mut keys = Vec::new();
        for (n, line) in self.text.lines().enumerate() {
            if let Some(name) = commented_table(line) {
                table = Some(name);
                keys.push((n + 1, name.to_string()));
            } else if let Some(key) = commented_key(line) {
                let key = match table {
                    Some(t) => format!("{t}.{key}"),
                    None => key.to_string(),
                };
                keys.push((n + 1, key));
            }
        }
        keys
    }

    /// Checks the file against the configuration; returns the loaded config.
    fn check(&self) -> Config {
        let name = self.path.display();
        let config = Config::from_toml(&self.text)
            .unwrap_or_else(|e| panic!("{name}: the server refuses it: {e}"));

        let active = self.active_keys();
        let commented = self.commented_keys();
        let mut listed = active.clone();
        for (line, key) in &commented {
            assert!(
                listed.insert(key.clone()),
                "{name}:{line}: `{key}` is listed twice"
            );
        }
        let all = all_keys();
        let missing: Vec<_> = all.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "{name}: keys missing from the sample: {missing:?}. Add each with a comment \
             giving its meaning, unit and default (and to the other samples in tuning/)"
        );
        let unknown: Vec<_> = listed.difference(&all).collect();
        assert!(unknown.is_empty(), "{name}: not config keys: {unknown:?}");
        // Keys with a default value are set, so the file shows every value;
        // only optional keys and the secret may be commented out.
        for key in default_keys() {
            assert!(
                active.contains(&key) || key == "token_secret",
                "{name}: `{key}` has a default value and must be set, not commented out"
            );
        }

        // The commented-out lines are valid TOML of the right types.
        let uncommented: String = self
            .text
            .lines()
            .map(|line| match commented_key(line).or(commented_table(line)) {
                Some(_) => line.trim_start_matches('#').trim_start(),
                None => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        toml::from_str::<Config>(&uncommented)
            .unwrap_or_else(|e| panic!("{name}: a commented-out key does not parse: {e}"));

        // Each key is introduced by a comment that states its default.
        let lines: Vec<&str> = self.text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let key = match commented_key(line) {
                Some(key) => key,
                None if !line.starts_with('#') && line.contains(" = ") => {
                    line.split(" = ").next().unwrap_or_default()
                }
                None => continue,
            };
            let comment: Vec<&str> = lines[..n]
                .iter()
                .rev()
                .take_while(|l| {
                    l.starts_with('#') && commented_key(l).is_none() && commented_table(l).is_none()
                })
                .copied()
                .collect();
            assert!(
                comment.iter().any(|l| l.contains("Default")),
                "{name}:{}: `{key}` has no comment saying its default",
                n + 1
            );
        }
        config
    }
}

#[test]
fn linux_sample_lists_every_key_and_loads() {
    let config = Sample::read("tuning/linux/tern.toml").check();
    assert_eq!(config.data_dir, Path::new("/var/lib/tern"));
    assert_eq!(config.stats_socket, Path::new("/run/tern/tern.sock"));
}

#[test]
fn freebsd_sample_lists_every_key_and_loads() {
    let config = Sample::read("tuning/freebsd/tern.toml").check();
    assert_eq!(config.data_dir, Path::new("/var/db/tern"));
    assert_eq!(config.stats_socket, Path::new("/var/run/tern/tern.sock"));
}

/// The check itself catches a missing key, so the tests above cannot pass
/// vacuously.
#[test]
#[should_panic(expected = "keys missing from the sample")]
fn a_sample_without_a_key_is_refused() {
    let mut sample = Sample::read("tuning/linux/tern.toml");
    sample.text = sample
        .text
        .lines()
        .filter(|l| !l.starts_with("queue_len_max"))
        .collect::<Vec<_>>()
        .join("\n");
    sample.check();
}

#[test]
#[should_panic(expected = "keys missing from the sample")]
fn a_sample_without_a_cluster_key_is_refused() {
    let mut sample = Sample::read("tuning/linux/tern.toml");
    sample.text = sample.text.replace("# lease_s = ", "# (no lease) ");
    sample.check();
}

#[test]
#[should_panic(expected = "keys missing from the sample")]
fn a_sample_without_an_optional_key_is_refused() {
    let mut sample = Sample::read("tuning/linux/tern.toml");
    sample.text = sample.text.replace("# tls_listen = ", "# (no tls) ");
    sample.check();
}
