use super::*;
use std::env;

fn recover(dir: &Path, o: &LogOptions) -> Recovery {
    let (store, r) = LogStore::open(dir, o.clone()).unwrap();
    drop(store);
    r
}

#[test]
#[ignore = "writes hundreds of MiB; run explicitly, in release"]
fn recovery_time_per_gib() {
    let mib: u64 = env::var("TERN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let base = env::var_os("TERN_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(env::temp_dir);
    let tmp = tempfile::tempdir_in(base).unwrap();
    let o = LogOptions {
        durability: Durability::Os,
        queue_len_max: 1_000_000,
        ..LogOptions::default()
    };
    let users = 50_000;
    let started = Instant::now();
    let (mut s, _) = LogStore::open(tmp.path(), o.clone()).unwrap();
    let mut id = 0u64;
    while s.disk_bytes() < mib << 20 {
        for _ in 0..4096 {
            id += 1;
            let msg = Stored {
                server_id: id << 10,
                from: id % 1000,
                time_ms: 1_700_000_000_000 + id,
                origin: None,
                body: vec![(id % 251) as u8; 200].into(),
            };
            s.push(id % users, msg).unwrap();
        }
        s.commit(&mut Vec::new()).unwrap();
    }
    let bytes = s.disk_bytes();
    let write_s = started.elapsed().as_secs_f64();
    drop(s);
    let gib = bytes as f64 / (1u64 << 30) as f64;
    let report = |what: &str, r: &Recovery| {
        let secs = r.elapsed.as_secs_f64();
        println!(
            "recovery ({what}): {} MiB, {} segments, {} records, {} messages in {:.3} s \
             = {:.2} s/GiB ({:.0} MiB/s)",
            bytes >> 20,
            r.segments,
            r.records,
            r.messages,
            secs,
            secs / gib,
            bytes as f64 / (1 << 20) as f64 / secs
        );
    };
    println!(
        "wrote {} MiB ({id} messages of 200 bytes) in {write_s:.2} s",
        bytes >> 20
    );
    let runs: usize = env::var("TERN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..runs {
        let warm = recover(tmp.path(), &o);
        assert_eq!(warm.messages as u64, id);
        report("page cache warm", &warm);
    }
    if env::var_os("TERN_BENCH_DROP_CACHES").is_some() {
        let status = std::process::Command::new("sh")
            .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
            .status()
            .unwrap();
        assert!(status.success(), "dropping the page cache needs root");
        report("page cache cold", &recover(tmp.path(), &o));
    }
}
