//! The `meta` file: format version and the server-id watermark, replaced
//! atomically (see "On disk" and "Server ids" in the module docs).

use std::fs;
use std::path::Path;

use super::*;
use crate::store::files;

impl LogStore {
    /// Replaces `meta` with one holding `watermark`.
    pub(super) fn write_meta(&mut self, watermark: u64) -> Result<(), StoreError> {
        let tmp = self.dir.join(META_TMP);
        let text = format!("{META_MAGIC}\nversion {FORMAT_VERSION}\nserver_id_max {watermark}\n");
        let written = files::create(&tmp).and_then(|file| {
            files::write(&file, &tmp, text.as_bytes())?;
            if self.fsync() {
                files::sync(&file, &tmp, false)?;
            }
            Ok(())
        });
        if let Err(e) = written {
            // A partial meta.tmp would only take space; the old meta stands.
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&tmp, "write")(e));
        }
        if self.fsync() {
            self.syncs += 1;
        }
        let path = self.dir.join(META);
        files::rename(&tmp, &path).map_err(io_at(&path, "replace"))?;
        let dir = self.dir.clone();
        self.sync_dir(&dir)?;
        self.id_watermark = watermark;
        Ok(())
    }

    pub(super) fn watermark_due(&self) -> bool {
        self.server_id_max.saturating_add(ID_RESERVE / 2) > self.id_watermark
    }
}

pub(super) fn read_meta(path: &Path) -> Result<u64, StoreError> {
    let text = fs::read_to_string(path).map_err(io_at(path, "read"))?;
    let bad = |reason: String| StoreError::Meta {
        path: path.to_path_buf(),
        reason,
    };
    let mut lines = text.lines();
    if lines.next() != Some(META_MAGIC) {
        return Err(bad(format!("does not start with {META_MAGIC:?}")));
    }
    let version = lines
        .next()
        .and_then(|l| l.strip_prefix("version "))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad("no version line".to_string()))?;
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads version {FORMAT_VERSION}"
        )));
    }
    lines
        .next()
        .and_then(|l| l.strip_prefix("server_id_max "))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| bad("no server_id_max line".to_string()))
}
