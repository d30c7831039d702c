//! One tracing event per call under the `milvus_sidecar::call` target: failures at info
//! (warn when the sidecar or the upstream failed), successes at debug, or at info with
//! `--access-log`. Strings from the client go through `%`/`?` formatting, never raw.

use crate::facts::{CallFacts, ReplyDetail, RequestDetail};

pub fn write(f: &CallFacts, access_log: bool) {
    {
        use tonic::Code;
        let (nq, top_k, rows) = match &f.request.detail {
            RequestDetail::Search(s) => (Some(s.nq), s.top_k, None),
            RequestDetail::Insert { rows } => (None, None, Some(*rows)),
            _ => (None, None, None),
        };
        let (hits, acked) = match f.reply {
            ReplyDetail::Search { hits, .. } => (Some(hits), None),
            ReplyDetail::Mutation { inserted, deleted, upserted } => (None, Some(inserted + deleted + upserted)),
            ReplyDetail::Rows(rows) => (Some(rows), None),
            ReplyDetail::None | ReplyDetail::Indexes(_) => (None, None),
        };
        macro_rules! event {
            ($level:expr) => {
                tracing::event!(
                    target: "milvus_sidecar::call",
                    $level,
                    id = %f.id,
                    method = f.method.name(),
                    // Strings from clients go in quoted and escaped (`?`-style: str values
                    // are recorded with Debug), never raw: no escape sequences, no forged lines.
                    database = f.database.as_str(),
                    collection = f.request.collection.as_deref(),
                    partitions = ?f.request.partitions,
                    nq,
                    top_k,
                    rows,
                    hits,
                    acked,
                    grpc = ?f.outcome.grpc,
                    milvus_code = f.outcome.milvus_code,
                    error = f.outcome.message.as_deref(),
                    request_bytes = f.request_bytes,
                    reply_bytes = f.reply_bytes,
                    duration_us = f.duration.as_micros() as u64,
                    peer = ?f.client.peer,
                    user = f.client.user.as_deref(),
                    "call"
                )
            };
        }
        match f.outcome.grpc {
            Code::Ok if f.outcome.is_success() && access_log => event!(tracing::Level::INFO),
            Code::Ok if f.outcome.is_success() => event!(tracing::Level::DEBUG),
            Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown => {
                event!(tracing::Level::WARN)
            }
            _ => event!(tracing::Level::INFO),
        }
    }
}
