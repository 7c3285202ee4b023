//! A sink's on-disk queue of unsent messages (`<spool_dir>/<sink>/spool`, one formatted
//! message per line) and its cursor (`cursor`, the byte offset of the first unsent line,
//! saved after every send): bounded by `spool_max_bytes`, compacted once sent.

use anyhow::Context;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The on-disk queue of unsent messages.
pub(super) struct Spool {
    path: PathBuf,
    cursor_path: PathBuf,
    file: std::fs::File,
    /// Offset of the first unsent line.
    pub(super) cursor: u64,
    pub(super) len: u64,
    pub(super) max: u64,
}

impl Spool {
    pub(super) fn open(dir: &Path, max: u64) -> anyhow::Result<Spool> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("spool");
        let cursor_path = dir.join("cursor");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        let cursor = std::fs::read_to_string(&cursor_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
            .min(len);
        Ok(Spool {
            path,
            cursor_path,
            file,
            cursor,
            len,
            max,
        })
    }

    pub(super) fn pending(&self) -> u64 {
        self.len - self.cursor
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending() == 0
    }

    pub(super) fn save_cursor(&mut self) -> std::io::Result<()> {
        if self.is_empty() {
            // Everything sent: start the file again.
            self.file.set_len(0)?;
            self.len = 0;
            self.cursor = 0;
        }
        std::fs::write(&self.cursor_path, self.cursor.to_string())
    }

    /// The next unsent lines from the cursor, at most `n`, with their end offsets.
    pub(super) fn peek_lines(&mut self, n: usize) -> std::io::Result<Vec<(String, u64)>> {
        let mut r = std::io::BufReader::new(&self.file);
        r.seek(SeekFrom::Start(self.cursor))?;
        let mut out = Vec::new();
        let mut at = self.cursor;
        let mut line = String::new();
        while out.len() < n {
            line.clear();
            let read = r.read_line(&mut line)?;
            if read == 0 || !line.ends_with('\n') {
                break; // end, or a torn last line
            }
            at += read as u64;
            out.push((line.trim_end_matches('\n').to_string(), at));
        }
        Ok(out)
    }

    /// Drops the oldest unsent lines until `room` more bytes fit; how many were dropped.
    pub(super) fn make_room(&mut self, room: u64) -> std::io::Result<u64> {
        let mut dropped = 0;
        while self.pending() + room > self.max && !self.is_empty() {
            let lines = self.peek_lines(256)?;
            if lines.is_empty() {
                self.cursor = self.len;
                break;
            }
            for (_, end) in lines {
                if self.pending() + room <= self.max {
                    break;
                }
                self.cursor = end;
                dropped += 1;
            }
        }
        self.save_cursor()?;
        Ok(dropped)
    }

    pub(super) fn push(&mut self, msg: &str) -> std::io::Result<()> {
        let line = format!("{msg}\n");
        self.file.write_all(line.as_bytes())?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Rewrites the file without its sent part when that part is large.
    pub(super) fn compact(&mut self) -> std::io::Result<()> {
        if self.cursor < self.max.max(1 << 20) {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut src = std::fs::File::open(&self.path)?;
            src.seek(SeekFrom::Start(self.cursor))?;
            let mut dst = std::fs::File::create(&tmp)?;
            std::io::copy(
                &mut Read::by_ref(&mut src).take(self.len - self.cursor),
                &mut dst,
            )?;
        }
        std::fs::rename(&tmp, &self.path)?;
        use std::os::unix::fs::OpenOptionsExt;
        self.file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        self.len -= self.cursor;
        self.cursor = 0;
        std::fs::write(&self.cursor_path, "0")
    }
}
