//! What the operating system allows and has left: open-files limit and
//! available memory.

use std::io;

/// The soft open-files limit (RLIMIT_NOFILE) of this process.
pub fn nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit; getrlimit only writes it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // rlim_t is u64 on Linux but i64 on FreeBSD.
    #[allow(clippy::unnecessary_cast)]
    Ok(lim.rlim_cur as u64)
}

/// `MemAvailable` from /proc/meminfo, in bytes. `None` where the file does not
/// exist (FreeBSD) or has no such line; the memory floor is then not enforced.
pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo_available(&text)
}

fn parse_meminfo_available(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => Some(value * 1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Parses a byte size: `3GiB`, `512MiB`, `64KiB`, `3G`, `1.5GiB`, `1000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num
        .parse()
        .map_err(|_| format!("`{s}`: expected a size like 3GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("`{s}`: unknown unit `{other}`")),
    };
    if !num.is_finite() || num < 0.0 {
        return Err(format!("`{s}`: must be a non-negative size"));
    }
    Ok((num * mult as f64) as u64)
}

/// Formats bytes with a binary unit, e.g. `3.0GiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_line() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\nMemAvailable:   24157936 kB\n";
        assert_eq!(parse_meminfo_available(text), Some(24157936 * 1024));
        assert_eq!(parse_meminfo_available("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("3GiB").unwrap(), 3 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert!(parse_bytes("3XB").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert_eq!(fmt_bytes(3 << 30), "3.0GiB");
        assert_eq!(fmt_bytes(10), "10B");
    }

    #[test]
    fn limits_readable() {
        assert!(nofile_limit().unwrap() > 0);
    }
}
