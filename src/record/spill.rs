//! The spill file: records kept on local disk, in order, while PostgreSQL is unreachable,
//! and replayed from it when PostgreSQL returns. One JSON document per line.

use std::path::{Path, PathBuf};

use tokio::fs::{File, OpenOptions};
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};

use super::rows::Record;

pub struct Spill {
    path: PathBuf,
    rejected: PathBuf,
    /// Records in the file not yet replayed (counted from the replay position).
    waiting: u64,
    /// Byte offset of the first record not yet replayed.
    replayed_to: u64,
}

impl Spill {
    /// Opens the spill directory; records left by an earlier run are replayed first.
    pub async fn open(dir: &Path) -> std::io::Result<Spill> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join("records.jsonl");
        let waiting = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes.iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        if waiting > 0 {
            tracing::info!(records = waiting, path = %path.display(), "found records spilled by an earlier run; they will be replayed");
        }
        Ok(Spill { path, rejected: dir.join("rejected.jsonl"), waiting, replayed_to: 0 })
    }

    pub fn waiting(&self) -> u64 {
        self.waiting
    }

    /// Appends records. They are in the operating system's hands when this returns, so a
    /// killed sidecar loses none; an fsync per batch (surviving a machine crash too) would
    /// cost more than the PostgreSQL write it stands in for.
    pub async fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        append_lines(&self.path, records).await?;
        self.waiting += records.len() as u64;
        Ok(())
    }

    /// Keeps records PostgreSQL refused for a reason retrying cannot fix, for an operator.
    pub async fn reject(&mut self, records: &[Record]) -> std::io::Result<()> {
        append_lines(&self.rejected, records).await
    }

    pub fn rejected_path(&self) -> &Path {
        &self.rejected
    }

    /// Up to `max` records from the replay position, and the position after them.
    pub async fn peek(&self, max: usize) -> std::io::Result<(Vec<Record>, u64)> {
        let mut file = File::open(&self.path).await?;
        file.seek(std::io::SeekFrom::Start(self.replayed_to)).await?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut offset = self.replayed_to;
        let mut line = String::new();
        while records.len() < max {
            line.clear();
            let read = reader.read_line(&mut line).await?;
            if read == 0 || !line.ends_with('\n') {
                break; // end of file, or a line cut short by a crash mid-write
            }
            offset += read as u64;
            match serde_json::from_str(&line) {
                Ok(record) => records.push(record),
                Err(e) => tracing::error!(error = %e, "skipping an unreadable line in the spill file"),
            }
        }
        Ok((records, offset))
    }

    /// Marks everything before `offset` as replayed; removes the file once all is.
    pub async fn advance(&mut self, offset: u64, records: usize) -> std::io::Result<()> {
        self.replayed_to = offset;
        self.waiting = self.waiting.saturating_sub(records as u64);
        if self.waiting == 0 {
            tokio::fs::remove_file(&self.path).await.or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })?;
            self.replayed_to = 0;
        }
        Ok(())
    }
}

async fn append_lines(path: &Path, records: &[Record]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(records.len() * 512);
    for record in records {
        serde_json::to_writer(&mut buf, record).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    let mut file = OpenOptions::new().create(true).append(true).open(path).await?;
    file.write_all(&buf).await?;
    file.flush().await
}
