//! Segment files: their names and the scan that recovery runs over their
//! bytes. Pure functions over byte slices; the file I/O is in `log/`.

use super::record::{decode, Decoded, Record};

/// Sector size assumed for torn-write detection: a write that was not fully
/// persisted leaves whole unwritten sectors, which read back as zeros.
pub(crate) const SECTOR_BYTES: usize = 512;

/// File name of segment `number`: `00000001.log`, `00000002.log`, ...
pub(crate) fn file_name(number: u32) -> String {
    format!("{number:08}.log")
}

/// The segment number of a file name made by [`file_name`].
pub(crate) fn parse_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&n| n >= 1)
}

/// One step of a [`Scanner`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<'a> {
    /// A valid record at `offset`, `len` bytes long.
    Record {
        offset: usize,
        len: usize,
        record: Record<'a>,
    },
    /// Bytes at `offset` that are not a valid record.
    Bad {
        offset: usize,
        reason: &'static str,
        /// Where the next valid record starts; `None` = none up to the end.
        resume: Option<usize>,
        /// Whether `offset..resume` holds a whole all-zero sector (counted
        /// from the start of the file), the mark of a write that was cut
        /// short by a power loss rather than of damaged data.
        zero_sector: bool,
    },
}

/// Walks a segment's bytes record by record. After a bad record it resumes
/// at the next offset where a valid record starts (found by trying every
/// byte), so one damaged record does not hide the rest of the file.
pub(crate) struct Scanner<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Scanner<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Scanner<'a> {
        Scanner { buf, pos: 0 }
    }
}

impl<'a> Iterator for Scanner<'a> {
    type Item = Step<'a>;

    fn next(&mut self) -> Option<Step<'a>> {
        let offset = self.pos;
        if offset >= self.buf.len() {
            return None;
        }
        let reason = match decode(&self.buf[offset..]) {
            Decoded::Record(record, len) => {
                // Paired with the check in `Record::encode`: what we read
                // back is a record we could have written.
                debug_assert!(record.is_valid());
                self.pos += len;
                return Some(Step::Record {
                    offset,
                    len,
                    record,
                });
            }
            Decoded::Incomplete => "record runs past the end of the file",
            Decoded::Malformed(reason) => reason,
        };
        let resume = next_valid(self.buf, offset + 1);
        let end = resume.unwrap_or(self.buf.len());
        self.pos = end;
        Some(Step::Bad {
            offset,
            reason,
            resume,
            zero_sector: has_zero_sector(self.buf, offset, end),
        })
    }
}

/// The first offset at or after `from` where a valid record starts. Every
/// offset is tried; most fail on the length check without touching the
/// payload, so a long zero-filled or garbage tail is cheap to pass over.
fn next_valid(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find(|&at| matches!(decode(&buf[at..]), Decoded::Record(..)))
}

/// Whether `buf[from..to]` contains an aligned, all-zero sector.
pub(crate) fn has_zero_sector(buf: &[u8], from: usize, to: usize) -> bool {
    let to = to.min(buf.len());
    let mut at = from.next_multiple_of(SECTOR_BYTES);
    while at + SECTOR_BYTES <= to {
        if buf[at..at + SECTOR_BYTES].iter().all(|&b| b == 0) {
            return true;
        }
        at += SECTOR_BYTES;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(id: u64, body: &[u8]) -> Record<'_> {
        Record::Queued {
            user: 1,
            server_id: id,
            from: 2,
            time_ms: 3,
            origin: None,
            body,
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(file_name(1), "00000001.log");
        assert_eq!(parse_file_name("00000001.log"), Some(1));
        assert_eq!(parse_file_name(&file_name(u32::MAX)), Some(u32::MAX));
        for bad in [
            "meta",
            "00000000.log",
            "1.log",
            "0000000a.log",
            "00000001.log.tmp",
            "99999999999.log",
        ] {
            assert_eq!(parse_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn scan_skips_a_damaged_record_and_resumes() {
        let mut buf = Vec::new();
        queued(1, b"first").encode(&mut buf);
        let second = buf.len();
        queued(2, b"second").encode(&mut buf);
        let third = buf.len();
        queued(3, b"third").encode(&mut buf);
        buf[second + 20] ^= 1;
        let steps: Vec<Step> = Scanner::new(&buf).collect();
        assert_eq!(steps.len(), 3);
        assert!(matches!(steps[0], Step::Record { offset: 0, .. }));
        assert_eq!(
            steps[1],
            Step::Bad {
                offset: second,
                reason: "checksum mismatch",
                resume: Some(third),
                zero_sector: false,
            }
        );
        assert!(matches!(steps[2], Step::Record { offset, .. } if offset == third));
    }

    #[test]
    fn scan_of_a_cut_record_finds_nothing_after_it() {
        let mut buf = Vec::new();
        queued(1, b"first").encode(&mut buf);
        let cut = buf.len();
        queued(2, b"second").encode(&mut buf);
        buf.truncate(buf.len() - 1);
        let steps: Vec<Step> = Scanner::new(&buf).collect();
        assert_eq!(
            steps[1],
            Step::Bad {
                offset: cut,
                reason: "record runs past the end of the file",
                resume: None,
                zero_sector: false,
            }
        );
    }

    #[test]
    fn zero_sectors_are_found_only_when_whole_and_aligned() {
        let mut buf = vec![1u8; 4 * SECTOR_BYTES];
        buf[SECTOR_BYTES + 1..3 * SECTOR_BYTES - 1].fill(0);
        // Zeros from 513 to 1534: no aligned sector is entirely zero.
        assert!(!has_zero_sector(&buf, 0, buf.len()));
        buf[SECTOR_BYTES] = 0;
        assert!(has_zero_sector(&buf, 0, buf.len()));
        assert!(has_zero_sector(&buf, SECTOR_BYTES, 2 * SECTOR_BYTES));
        assert!(!has_zero_sector(&buf, SECTOR_BYTES + 1, buf.len()));
        assert!(!has_zero_sector(&buf, 0, 2 * SECTOR_BYTES - 1));
        assert!(!has_zero_sector(&[], 0, 0));
    }
}
