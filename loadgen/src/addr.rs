//! Source and server address lists, and how connections are spread over them.
//!
//! Connection `g` (global index) uses source `g % sources` and server
//! `(g / sources) % servers`, so every (source, server) pair gets the same
//! share and no pair runs out of ephemeral ports before the others
//! (BOX-FACTS: keep each pair under ~30-50% of the port range).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Most addresses a list may expand to (a /16 worth); bounds the parser.
pub const ADDRS_MAX: usize = 65_536;

/// Parses `127.0.0.2-127.0.0.250` (an inclusive IPv4 range), a comma list of
/// addresses, or a mix: `10.0.0.1,127.0.0.2-127.0.0.9`.
pub fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .map_err(|e| format!("`{a}` in `{part}`: {e}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .map_err(|e| format!("`{b}` in `{part}`: {e}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                return Err(format!("`{part}`: range runs backwards"));
            }
            if (b - a) as usize >= ADDRS_MAX || out.len() + (b - a) as usize >= ADDRS_MAX {
                return Err(format!("`{part}`: more than {ADDRS_MAX} addresses"));
            }
            out.extend((a..=b).map(|v| IpAddr::V4(Ipv4Addr::from(v))));
        } else {
            let ip: IpAddr = part.parse().map_err(|e| format!("`{part}`: {e}"))?;
            out.push(ip);
        }
        if out.len() > ADDRS_MAX {
            return Err(format!("more than {ADDRS_MAX} addresses"));
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(out)
}

/// Parses `127.0.0.1:5222,127.0.0.1:5223` or a port range on one host,
/// `127.0.0.1:5222-5229`.
pub fn parse_servers(s: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(addr) = part.parse::<SocketAddr>() {
            out.push(addr);
            continue;
        }
        let (host, ports) = part
            .rsplit_once(':')
            .ok_or_else(|| format!("`{part}`: expected ADDR:PORT or ADDR:PORT-PORT"))?;
        let (p0, p1) = ports
            .split_once('-')
            .ok_or_else(|| format!("`{part}`: expected ADDR:PORT or ADDR:PORT-PORT"))?;
        let ip: IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|e| format!("`{host}`: {e}"))?;
        let p0: u16 = p0.parse().map_err(|e| format!("`{p0}`: {e}"))?;
        let p1: u16 = p1.parse().map_err(|e| format!("`{p1}`: {e}"))?;
        if p1 < p0 {
            return Err(format!("`{part}`: port range runs backwards"));
        }
        out.extend((p0..=p1).map(|p| SocketAddr::new(ip, p)));
        if out.len() > ADDRS_MAX {
            return Err(format!("more than {ADDRS_MAX} servers"));
        }
    }
    if out.is_empty() {
        return Err("no server given".into());
    }
    Ok(out)
}

/// The (source index, server index) of global connection `g`.
pub fn spread(g: u64, sources: usize, servers: usize) -> (usize, usize) {
    debug_assert!(sources > 0 && servers > 0);
    let src = (g % sources as u64) as usize;
    let dst = ((g / sources as u64) % servers as u64) as usize;
    (src, dst)
}

/// Most connections any (source, server) pair gets when `conns` are spread.
pub fn conns_per_pair_max(conns: u64, sources: usize, servers: usize) -> u64 {
    conns.div_ceil((sources * servers) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_range_and_list() {
        let v = parse_sources("127.0.0.2-127.0.0.250").unwrap();
        assert_eq!(v.len(), 249);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(v[248], "127.0.0.250".parse::<IpAddr>().unwrap());
        let v = parse_sources("127.0.0.1, 127.0.0.5-127.0.0.6").unwrap();
        assert_eq!(v.len(), 3);
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_sources("").is_err());
        assert!(parse_sources("10.0.0.0-10.2.0.0").is_err());
        // A range across an octet boundary.
        assert_eq!(parse_sources("127.0.0.255-127.0.1.1").unwrap().len(), 3);
    }

    #[test]
    fn server_list_and_port_range() {
        let v = parse_servers("127.0.0.1:5222,127.0.0.1:5223").unwrap();
        assert_eq!(v.len(), 2);
        let v = parse_servers("127.0.0.1:6000-6003").unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[3].port(), 6003);
        assert!(parse_servers("127.0.0.1").is_err());
        assert!(parse_servers("127.0.0.1:9-1").is_err());
    }

    #[test]
    fn spread_uses_every_pair_evenly() {
        let (s, d) = (3, 2);
        let mut counts = vec![0u64; s * d];
        for g in 0..600 {
            let (a, b) = spread(g, s, d);
            counts[a * d + b] += 1;
        }
        assert!(counts.iter().all(|&c| c == 100), "{counts:?}");
        assert_eq!(conns_per_pair_max(601, s, d), 101);
    }
}
