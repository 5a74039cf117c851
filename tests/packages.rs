//! The packages (issue 24), checked as far as a Linux box allows without
//! building them (CI builds and installs the .deb in a container:
//! `tuning/linux/systemd-test.sh --deb`):
//!
//! - the FreeBSD port skeleton `tuning/freebsd/port/`: its Makefile's name,
//!   version and license match Cargo.toml, it builds and installs the
//!   server's binary target, every file it takes from the source tree
//!   exists, and `pkg-plist` lists exactly the files it installs;
//! - the Debian package's `[package.metadata.deb]` in Cargo.toml: every
//!   asset exists or is the binary cargo builds, the config is a conffile,
//!   the maintainer scripts are there, and the unit's drop-in starts
//!   `/usr/bin/tern` with the unit's own arguments.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = repo().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cargo_toml() -> toml::Value {
    read("Cargo.toml").parse().expect("Cargo.toml parses")
}

/// The `[[bin]]` targets of the server crate.
fn bin_targets(cargo: &toml::Value) -> Vec<String> {
    cargo["bin"]
        .as_array()
        .expect("[[bin]]")
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

/// A port Makefile: its variables, and its recipe lines (continuations
/// joined).
struct Makefile {
    vars: Vec<(String, String)>,
    recipes: Vec<String>,
}

impl Makefile {
    fn parse(text: &str) -> Makefile {
        let mut lines = Vec::new();
        let mut pending = String::new();
        for line in text.lines() {
            match line.strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    lines.push(std::mem::take(&mut pending));
                }
            }
        }
        let mut vars = Vec::new();
        let mut recipes = Vec::new();
        for line in lines {
            if line.starts_with('\t') {
                recipes.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
            } else if !line.starts_with('#') && !line.starts_with('.') {
                if let Some((k, v)) = line.split_once('=') {
                    let value = v.split('#').next().unwrap().trim().to_string();
                    vars.push((k.trim_end_matches('+').trim().to_string(), value));
                }
            }
        }
        Makefile { vars, recipes }
    }

    fn var(&self, name: &str) -> &str {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("the port Makefile sets no {name}"))
    }
}

/// Every path after `prefix` in `line` (up to the next space).
fn paths_after<'a>(line: &'a str, prefix: &str) -> Vec<&'a str> {
    line.match_indices(prefix)
        .map(|(at, _)| {
            let rest = &line[at + prefix.len()..];
            rest.split_whitespace().next().unwrap_or("")
        })
        .collect()
}

#[test]
fn freebsd_port_matches_cargo_and_the_source_tree() {
    let cargo = cargo_toml();
    let package = &cargo["package"];
    let make = Makefile::parse(&read("tuning/freebsd/port/Makefile"));

    assert_eq!(make.var("PORTNAME"), package["name"].as_str().unwrap());
    assert_eq!(
        make.var("DISTVERSION"),
        package["version"].as_str().unwrap()
    );
    assert_eq!(package["license"].as_str(), None, "license is inherited");
    let license = cargo["workspace"]["package"]["license"].as_str().unwrap();
    assert_eq!((license, make.var("LICENSE")), ("Apache-2.0", "APACHE20"));
    assert!(make.var("USES").split_whitespace().any(|u| u == "cargo"));
    assert_eq!(make.var("CARGO_INSTALL"), "no");

    // It builds one binary target of the server crate and installs it.
    let args: Vec<&str> = make.var("CARGO_BUILD_ARGS").split_whitespace().collect();
    assert_eq!(&args[..3], ["--package", "tern", "--bin"]);
    let bin = args[3];
    assert!(bin_targets(&cargo).iter().any(|b| b == bin), "{bin}");
    let built = Path::new(env!("CARGO_BIN_EXE_tern"));
    assert!(built.is_file(), "cargo built {}", built.display());
    assert_eq!(built.file_name().unwrap(), bin);

    // Sources from the tree exist; destinations are what pkg-plist lists.
    let mut installed = BTreeSet::new();
    for line in &make.recipes {
        for src in paths_after(line, "${WRKSRC}/") {
            assert!(
                repo().join(src).is_file(),
                "the port takes {src}, not in the tree"
            );
        }
        for src in paths_after(line, "release/") {
            assert_eq!(src, bin, "{line}");
        }
        if line.starts_with("${MKDIR}") {
            continue;
        }
        for dest in paths_after(line, "${STAGEDIR}${PREFIX}/") {
            installed.insert(dest.to_string());
        }
        for dest in paths_after(line, "${STAGEDIR}${DATADIR}/") {
            installed.insert(format!("%%DATADIR%%/{dest}"));
        }
    }
    let plist: BTreeSet<String> = read("tuning/freebsd/port/pkg-plist")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.strip_prefix("@sample ").unwrap_or(l).to_string())
        .collect();
    assert!(installed.contains(&format!("bin/{bin}")));
    assert_eq!(
        installed, plist,
        "pkg-plist against the files the Makefile installs"
    );

    // The rc.d script it installs is the tree's, with only PREFIX paths to
    // rewrite; the config it requires is the one @sample installs.
    let rc = read("tuning/freebsd/rc.d/tern");
    assert!(rc.contains(": \"${tern_bin:=/usr/local/bin/tern}\""));
    assert!(rc.contains(": \"${tern_config:=/usr/local/etc/tern.toml}\""));
    assert!(read("tuning/freebsd/port/pkg-plist").contains("@sample etc/tern.toml.sample\n"));
    for file in ["pkg-descr", "pkg-message"] {
        assert!(!read(format!("tuning/freebsd/port/{file}"))
            .trim()
            .is_empty());
    }
}

#[test]
fn debian_metadata_matches_the_source_tree() {
    let cargo = cargo_toml();
    let deb = &cargo["package"]["metadata"]["deb"];
    let bins = bin_targets(&cargo);
    let mut dests = BTreeSet::new();
    for asset in deb["assets"].as_array().expect("assets") {
        let [src, dest, mode] = asset.as_array().unwrap().as_slice() else {
            panic!("an asset is [source, destination, mode]: {asset}");
        };
        let (src, dest, mode) = (
            src.as_str().unwrap(),
            dest.as_str().unwrap(),
            mode.as_str().unwrap(),
        );
        match src.strip_prefix("target/release/") {
            Some(bin) => assert!(bins.iter().any(|b| b == bin), "{src} is not a [[bin]]"),
            None => assert!(repo().join(src).is_file(), "asset {src} is not in the tree"),
        }
        assert!(
            u32::from_str_radix(mode, 8).is_ok_and(|m| m <= 0o755),
            "{mode}"
        );
        let name = Path::new(src).file_name().unwrap().to_str().unwrap();
        dests.insert(match dest.strip_suffix('/') {
            Some(dir) => format!("/{dir}/{name}"),
            None => format!("/{dest}"),
        });
    }
    for conf in deb["conf-files"].as_array().unwrap() {
        assert!(
            dests.contains(conf.as_str().unwrap()),
            "{conf} is not an asset"
        );
    }
    for must in [
        "/usr/bin/tern",
        "/lib/systemd/system/tern.service",
        "/lib/systemd/system/tern.service.d/deb.conf",
        "/usr/lib/sysctl.d/99-tern.conf",
        "/etc/tern/tern.toml",
    ] {
        assert!(dests.contains(must), "the package lacks {must}: {dests:?}");
    }
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    for script in ["postinst", "prerm", "postrm"] {
        assert!(repo().join(scripts).join(script).is_file(), "{script}");
    }
    assert!(read(Path::new(scripts).join("postinst")).contains("useradd --system"));

    // The drop-in runs the package's binary with the unit's own arguments.
    let exec_start = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("ExecStart="))
            .map(String::from)
            .collect()
    };
    let unit = exec_start(&read("tuning/linux/tern.service"));
    let dropin = exec_start(&read("tuning/linux/deb/tern.service.d/deb.conf"));
    assert_eq!(unit.len(), 1);
    assert_eq!(
        dropin,
        [
            "".to_string(),
            unit[0].replacen("/usr/local/bin/tern", "/usr/bin/tern", 1)
        ]
    );
}
