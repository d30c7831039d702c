//! The spill file: records kept on local disk, in order, while PostgreSQL is unreachable,
//! and replayed from it when PostgreSQL returns. One JSON document per line.
//!
//! What survives what: a record appended here is in the operating system's hands, so a
//! killed sidecar (even `kill -9`) loses none of it. With `sync` (`--durable-records`) every
//! append is also fsynced before it counts as done, so it survives a machine crash too.

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
    /// Bytes in the file: it shrinks only once everything in it is replayed.
    size: u64,
    /// Largest the file may grow (0: no cap). A full disk would fail appends anyway, and
    /// in Kubernetes an emptyDir past its sizeLimit evicts the whole pod, Milvus included:
    /// records dropped at a known size are the smaller loss.
    max_bytes: u64,
    /// fsync each append (and the directory, when the file is new).
    sync: bool,
}

impl Spill {
    /// Opens the spill directory; records left by an earlier run are replayed first.
    /// A line cut short by a crash mid-append is removed, so that the next append does not
    /// glue a record onto it.
    pub async fn open(dir: &Path, sync: bool, max_bytes: u64) -> std::io::Result<Spill> {
        tokio::fs::create_dir_all(dir).await?;
        let path = dir.join("records.jsonl");
        let (waiting, size) = match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                if complete < bytes.len() {
                    tracing::warn!(bytes = bytes.len() - complete, path = %path.display(),
                        "the spill file ends in a record cut short by a crash; removing that part");
                    let file = OpenOptions::new().write(true).open(&path).await?;
                    file.set_len(complete as u64).await?;
                    file.sync_all().await?;
                }
                (bytes[..complete].iter().filter(|&&b| b == b'\n').count() as u64, complete as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e),
        };
        if waiting > 0 {
            tracing::info!(records = waiting, path = %path.display(), "found records spilled by an earlier run; they will be replayed");
        }
        Ok(Spill { path, rejected: dir.join("rejected.jsonl"), waiting, replayed_to: 0, size, max_bytes, sync })
    }

    pub fn waiting(&self) -> u64 {
        self.waiting
    }

    /// Appends records. They are in the operating system's hands when this returns, so a
    /// killed sidecar loses none; with `sync` they are on disk (one fsync per batch).
    /// Past the cap nothing is appended and the error is [`std::io::ErrorKind::StorageFull`].
    pub async fn append(&mut self, records: &[Record]) -> std::io::Result<()> {
        let lines = lines(records)?;
        let size = self.size + lines.len() as u64;
        if self.max_bytes > 0 && size > self.max_bytes {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "the spill file {} holds {} bytes and may hold at most {} (--spill-max-bytes)",
                    self.path.display(),
                    self.size,
                    self.max_bytes
                ),
            ));
        }
        append_lines(&self.path, &lines, self.sync).await?;
        self.waiting += records.len() as u64;
        self.size = size;
        Ok(())
    }

    /// Keeps records PostgreSQL refused for a reason retrying cannot fix, for an operator.
    pub async fn reject(&mut self, records: &[Record]) -> std::io::Result<()> {
        append_lines(&self.rejected, &lines(records)?, self.sync).await
    }

    pub fn rejected_path(&self) -> &Path {
        &self.rejected
    }

    /// Up to `max` records from the replay position, fewer where their lines reach
    /// `max_bytes` (always at least one), and the position after them.
    pub async fn peek(&self, max: usize, max_bytes: u64) -> std::io::Result<(Vec<Record>, u64)> {
        let mut file = File::open(&self.path).await?;
        file.seek(std::io::SeekFrom::Start(self.replayed_to)).await?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut offset = self.replayed_to;
        let mut line = String::new();
        while records.len() < max && offset - self.replayed_to < max_bytes {
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
            self.size = 0;
        }
        Ok(())
    }
}

/// One JSON document per record, each on a line of its own.
fn lines(records: &[Record]) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(records.len() * 512);
    for record in records {
        serde_json::to_writer(&mut buf, record).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    Ok(buf)
}

async fn append_lines(path: &Path, buf: &[u8], sync: bool) -> std::io::Result<()> {
    let new = sync && !tokio::fs::try_exists(path).await?;
    let mut file = OpenOptions::new().create(true).append(true).open(path).await?;
    file.write_all(buf).await?;
    file.flush().await?;
    if sync {
        file.sync_data().await?;
        if new && let Some(dir) = path.parent() {
            // The file's name must reach the disk too, or a crash could lose all of it.
            File::open(dir).await?.sync_all().await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u32) -> Record {
        serde_json::from_value(serde_json::json!({
            "call": {
                "id": uuid::Uuid::now_v7(), "at": std::time::SystemTime::UNIX_EPOCH, "user": null,
                "database": "default", "collection": format!("c{n}"), "duration_ms": 1.0,
                "success": true, "grpc_code": 0, "milvus_code": 0, "error": null
            },
            "perf": null, "query": null, "ingestion": null, "audit": null, "mirror": null
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_record_cut_short_by_a_crash_is_dropped_and_the_rest_replayed() {
        let dir = std::env::temp_dir().join(format!("spill-unit-{}", uuid::Uuid::now_v7()));
        let mut spill = Spill::open(&dir, true, 0).await.unwrap();
        spill.append(&[record(1), record(2)]).await.unwrap();
        // A crash in the middle of the next append leaves half a line.
        let mut file = OpenOptions::new().append(true).open(dir.join("records.jsonl")).await.unwrap();
        file.write_all(b"{\"call\":{\"id\":").await.unwrap();
        drop(file);

        let mut spill = Spill::open(&dir, true, 0).await.unwrap();
        assert_eq!(spill.waiting(), 2, "the cut-short record is not counted");
        spill.append(&[record(3)]).await.unwrap();
        let (records, offset) = spill.peek(10, u64::MAX).await.unwrap();
        let names: Vec<_> = records.iter().map(|r| r.call.collection.clone().unwrap()).collect();
        assert_eq!(names, ["c1", "c2", "c3"], "the next append does not glue onto the cut line");
        spill.advance(offset, records.len()).await.unwrap();
        assert!(!dir.join("records.jsonl").exists(), "removed once everything is replayed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_replay_reads_at_most_its_bytes_and_at_least_one_record() {
        let dir = std::env::temp_dir().join(format!("spill-unit-{}", uuid::Uuid::now_v7()));
        let one = lines(&[record(1)]).unwrap().len() as u64;
        let mut spill = Spill::open(&dir, false, 0).await.unwrap();
        spill.append(&[record(1), record(2), record(3), record(4), record(5)]).await.unwrap();
        let (records, offset) = spill.peek(10, 2 * one).await.unwrap();
        assert_eq!(records.len(), 2, "two lines reach the bytes");
        spill.advance(offset, records.len()).await.unwrap();
        let (records, offset) = spill.peek(10, 1).await.unwrap();
        assert_eq!(records.len(), 1, "one record, however large");
        spill.advance(offset, records.len()).await.unwrap();
        let (records, _) = spill.peek(2, u64::MAX).await.unwrap();
        let names: Vec<_> = records.iter().map(|r| r.call.collection.clone().unwrap()).collect();
        assert_eq!(names, ["c4", "c5"], "then on from there, up to the count");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn past_its_cap_the_file_takes_nothing_until_it_is_replayed() {
        let dir = std::env::temp_dir().join(format!("spill-unit-{}", uuid::Uuid::now_v7()));
        let one = lines(&[record(1)]).unwrap().len() as u64;
        let mut spill = Spill::open(&dir, false, 2 * one + one / 2).await.unwrap();
        spill.append(&[record(1), record(2)]).await.unwrap();
        let full = spill.append(&[record(3)]).await.unwrap_err();
        assert_eq!(full.kind(), std::io::ErrorKind::StorageFull);
        assert!(full.to_string().contains("--spill-max-bytes"), "{full}");
        assert_eq!(spill.waiting(), 2, "the refused record is not counted");
        assert_eq!(std::fs::metadata(dir.join("records.jsonl")).unwrap().len(), 2 * one, "nor written");

        // A restart counts what is there against the cap.
        let mut spill = Spill::open(&dir, false, 2 * one + one / 2).await.unwrap();
        assert_eq!(spill.append(&[record(3)]).await.unwrap_err().kind(), std::io::ErrorKind::StorageFull);
        // Replaying only part of the file frees nothing; replaying all of it frees it all.
        let (records, offset) = spill.peek(1, u64::MAX).await.unwrap();
        spill.advance(offset, records.len()).await.unwrap();
        assert_eq!(spill.append(&[record(3)]).await.unwrap_err().kind(), std::io::ErrorKind::StorageFull);
        let (records, offset) = spill.peek(10, u64::MAX).await.unwrap();
        spill.advance(offset, records.len()).await.unwrap();
        spill.append(&[record(3), record(4)]).await.unwrap();
        assert_eq!(spill.waiting(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
