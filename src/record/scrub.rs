//! PostgreSQL `text` and `jsonb` cannot hold NUL (U+0000), which protobuf strings may: one
//! such string would make PostgreSQL refuse the whole batch its record is in, other callers'
//! records with it. Records carry U+FFFD (the replacement character) in its place; every
//! other character is kept as sent.

use serde_json::Value;

use crate::facts::{CallFacts, ReplyDetail, RequestDetail};

pub fn string(s: &mut String) {
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
}

fn strings<'a>(all: impl IntoIterator<Item = &'a mut String>) {
    all.into_iter().for_each(string);
}

fn pairs(all: &mut [(String, String)]) {
    for (k, v) in all {
        string(k);
        string(v);
    }
}

/// Every string of `f` that can reach a row.
pub fn facts(f: &mut CallFacts) {
    string(&mut f.database);
    strings(&mut f.client.user);
    strings(&mut f.outcome.message);
    let request = &mut f.request;
    strings(request.database.iter_mut().chain(&mut request.collection).chain(&mut request.partitions));
    match &mut request.detail {
        RequestDetail::Search(s) => {
            string(&mut s.filter);
            strings(&mut s.output_fields);
            pairs(&mut s.params);
        }
        RequestDetail::Query { filter, output_fields, .. } => {
            string(filter);
            strings(output_fields);
        }
        RequestDetail::Delete { filter } => string(filter),
        RequestDetail::Import { files } => strings(files),
        RequestDetail::Rename { new_name, new_database } => {
            string(new_name);
            strings(new_database);
        }
        RequestDetail::Index { field_name, index_name, params } => {
            string(field_name);
            string(index_name);
            pairs(params);
        }
        // Read later by `read_schema`, whose output is scrubbed there.
        RequestDetail::CreateCollection { .. } | RequestDetail::None | RequestDetail::Insert { .. } => {}
    }
    if let ReplyDetail::Indexes(indexes) = &mut f.reply {
        for i in indexes {
            string(&mut i.index_name);
            string(&mut i.field_name);
            string(&mut i.fail_reason);
            pairs(&mut i.params);
        }
    }
}

/// Every string and key in `v`.
pub fn json(v: &mut Value) {
    match v {
        Value::String(s) => string(s),
        Value::Array(items) => items.iter_mut().for_each(json),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(map);
                for (mut k, v) in entries {
                    string(&mut k);
                    map.insert(k, v);
                }
            }
            map.values_mut().for_each(json);
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_becomes_the_replacement_character_and_nothing_else_changes() {
        let mut s = "a\0b\x1b[2J'; --".to_owned();
        string(&mut s);
        assert_eq!(s, "a\u{FFFD}b\x1b[2J'; --");
        let mut v = serde_json::json!({"k\0": ["x\0", 1, {"y": "\0"}]});
        json(&mut v);
        assert_eq!(v, serde_json::json!({"k\u{FFFD}": ["x\u{FFFD}", 1, {"y": "\u{FFFD}"}]}));
    }
}
