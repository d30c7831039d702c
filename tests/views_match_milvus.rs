//! Our views must read Milvus's messages: for every inspected RPC, each field a view
//! declares must exist in Milvus's own request/reply message under the same number, with a
//! wire-compatible type. The Milvus definitions are read from the `.proto` files shipped in
//! the milvus-sdk-rust crate, not copied here.

use std::collections::HashMap;

use milvus_sidecar::milvus::Rpc;

mod common;

#[derive(Debug, Clone)]
struct Field {
    repeated: bool,
    ty: String,
}

#[derive(Default)]
struct Protos {
    messages: HashMap<String, HashMap<u32, Field>>,
    enums: Vec<String>,
    /// rpc name -> (request type, reply type)
    rpcs: HashMap<String, (String, String)>,
}

impl Protos {
    fn parse(&mut self, text: &str) {
        // Blocks we are inside: message / enum / oneof / service / other.
        let mut stack: Vec<(String, String)> = Vec::new();
        let text = strip_block_comments(text);
        let text: String = text.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
        for statement in text.split_inclusive(['{', '}', ';']) {
            let s = statement.trim();
            if let Some(rest) = s.strip_prefix("rpc ") {
                let names: Vec<&str> = rest
                    .split(|c: char| c == '(' || c == ')' || c == '{' || c == ';' || c.is_whitespace())
                    .filter(|w| !w.is_empty() && *w != "stream" && *w != "returns")
                    .collect();
                self.rpcs.insert(names[0].into(), (simple(names[1]), simple(names[2])));
                if s.ends_with('{') {
                    stack.push(("rpc".into(), names[0].into()));
                }
            } else if s.ends_with('{') {
                let words: Vec<&str> = s.trim_end_matches('{').split_whitespace().collect();
                let kind = words.first().copied().unwrap_or("").to_string();
                let name = words.get(1).copied().unwrap_or("").to_string();
                if kind == "enum" {
                    self.enums.push(name.clone());
                }
                if kind == "message" && stack.is_empty() {
                    self.messages.entry(name.clone()).or_default();
                }
                stack.push((kind, name));
            } else if s.ends_with('}') {
                stack.pop();
            } else if let Some(message) = top_level_message(&stack)
                && let Some((number, field)) = parse_field(s)
            {
                self.messages.get_mut(&message).unwrap().insert(number, field);
            }
        }
    }
}

fn strip_block_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        rest = rest[start..].find("*/").map_or("", |end| &rest[start + end + 2..]);
    }
    out.push_str(rest);
    out
}

/// The top-level message whose fields we are reading (directly or inside a oneof).
fn top_level_message(stack: &[(String, String)]) -> Option<String> {
    match stack {
        [(kind, name)] if kind == "message" => Some(name.clone()),
        [(kind, name), (inner, _)] if kind == "message" && inner == "oneof" => Some(name.clone()),
        _ => None,
    }
}

fn parse_field(s: &str) -> Option<(u32, Field)> {
    let (decl, number) = s.trim_end_matches(';').split_once('=')?;
    let number: u32 = number.split_whitespace().next()?.trim_end_matches(';').parse().ok()?;
    let mut words: Vec<&str> = decl.split_whitespace().collect();
    if words.first().is_some_and(|w| w.starts_with("map<")) {
        return Some((number, Field { repeated: true, ty: "map".into() }));
    }
    let repeated = words.first() == Some(&"repeated");
    if matches!(words.first(), Some(&"repeated" | &"optional")) {
        words.remove(0);
    }
    Some((number, Field { repeated, ty: simple(words.first()?) }))
}

fn simple(ty: &str) -> String {
    ty.rsplit('.').next().unwrap().to_string()
}

fn load() -> (Protos, Protos) {
    let mut milvus = Protos::default();
    let dir = common::milvus_proto_dir();
    for file in ["common.proto", "schema.proto", "milvus.proto"] {
        milvus.parse(&std::fs::read_to_string(dir.join(file)).unwrap());
    }
    let mut views = Protos::default();
    views.parse(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proto/views.proto")).unwrap());
    (milvus, views)
}

/// Every field of `view` must be readable from `milvus`'s message.
fn check(milvus: &Protos, views: &Protos, view: &str, real: &str, trail: &str, problems: &mut Vec<String>) {
    let ours = &views.messages[view];
    let Some(theirs) = milvus.messages.get(real) else {
        problems.push(format!("{trail}: Milvus has no message {real}"));
        return;
    };
    for (number, field) in ours {
        let Some(real_field) = theirs.get(number) else {
            problems.push(format!("{trail}: {view} field {number} does not exist in Milvus's {real}"));
            continue;
        };
        if field.repeated != real_field.repeated {
            problems.push(format!(
                "{trail}: {view} field {number} repeated={} but {real} has {}",
                field.repeated, real_field.repeated
            ));
        }
        if views.messages.contains_key(&field.ty) {
            check(milvus, views, &field.ty, &real_field.ty, &format!("{trail}.{number}"), problems);
        } else {
            let enum_as_int = field.ty == "int32" && milvus.enums.contains(&real_field.ty);
            if field.ty != real_field.ty && !enum_as_int {
                problems.push(format!(
                    "{trail}: {view} field {number} is {} but Milvus's {real} has {}",
                    field.ty, real_field.ty
                ));
            }
        }
    }
}

#[test]
fn every_view_reads_the_milvus_message_it_stands_for() {
    let (milvus, views) = load();
    assert!(milvus.rpcs.len() > 100, "parsed only {} Milvus RPCs", milvus.rpcs.len());
    let mut problems = Vec::new();
    for rpc in Rpc::ALL {
        let Some((request, reply)) = milvus.rpcs.get(rpc.name()) else {
            problems.push(format!("{} is not a MilvusService method", rpc.name()));
            continue;
        };
        check(&milvus, &views, rpc.request().view(), request, rpc.name(), &mut problems);
        check(&milvus, &views, rpc.reply().view(), reply, &format!("{} reply", rpc.name()), &mut problems);
    }
    // The schema travels as bytes inside CreateCollectionRequest; its view is checked too.
    check(&milvus, &views, "CollectionSchema", "CollectionSchema", "CreateCollection schema", &mut problems);
    assert!(problems.is_empty(), "views disagree with Milvus:\n{}", problems.join("\n"));
}

#[test]
fn the_check_catches_a_view_with_a_wrong_field() {
    // The mistake this test exists for: reading DropIndex (index_name = 5) with
    // CreateIndex's view (extra_params = 5).
    let (milvus, views) = load();
    let mut problems = Vec::new();
    check(&milvus, &views, "CreateIndexRequest", "DropIndexRequest", "DropIndex", &mut problems);
    assert!(problems.iter().any(|p| p.contains("field 5")), "{problems:?}");
}

/// `milvus-sidecar sync` reads Milvus's replies through its own views (proto/sync.proto),
/// and DescribeIndex through views.proto's: the same check, RPC by RPC.
#[test]
fn sync_views_read_the_milvus_messages_they_stand_for() {
    let (milvus, views) = load();
    // sync.proto imports views.proto's shared messages.
    let mut sync = Protos::default();
    for file in ["views.proto", "sync.proto"] {
        sync.parse(&std::fs::read_to_string(format!("{}/proto/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap());
    }
    let mut problems = Vec::new();
    let calls = [
        ("ListDatabases", &sync, "ListDatabasesRequest", "ListDatabasesResponse"),
        ("ShowCollections", &sync, "ShowCollectionsRequest", "ShowCollectionsResponse"),
        ("DescribeCollection", &sync, "CollectionRequest", "DescribeCollectionResponse"),
        ("ShowPartitions", &sync, "CollectionRequest", "ShowPartitionsResponse"),
        ("DescribeIndex", &views, "IndexNameRequest", "DescribeIndexResponse"),
    ];
    for (rpc, ours, request_view, reply_view) in calls {
        let (request, reply) = &milvus.rpcs[rpc];
        check(&milvus, ours, request_view, request, rpc, &mut problems);
        check(&milvus, ours, reply_view, reply, &format!("{rpc} reply"), &mut problems);
    }
    // Deliberate, and the only difference allowed: sync declares DescribeCollectionResponse's
    // schema (2) as `bytes` to hand the encoded schema to `read_schema`, where Milvus has a
    // schema.CollectionSchema message. Both are length-delimited, so the bytes are exactly
    // the embedded message's, which views.proto's CollectionSchema (checked above) reads.
    let schema_as_bytes = "DescribeCollection reply: DescribeCollectionResponse field 2 is bytes but Milvus's DescribeCollectionResponse has CollectionSchema";
    assert!(problems.iter().any(|p| p == schema_as_bytes), "the schema-as-bytes difference is found: {problems:?}");
    problems.retain(|p| p != schema_as_bytes);
    assert!(problems.is_empty(), "sync's views disagree with Milvus:\n{}", problems.join("\n"));
}

/// The fields the sidecar streams through unread must be, in Milvus's request, the bulk
/// it thinks they are (repeated messages or values), and not fields its view reads.
#[test]
fn bulky_fields_are_row_data_the_views_do_not_read() {
    let (milvus, views) = load();
    let mut checked = 0;
    for rpc in Rpc::ALL {
        let bulky = rpc.request().bulky_fields();
        if bulky.is_empty() {
            continue;
        }
        let (request, _) = &milvus.rpcs[rpc.name()];
        let theirs = &milvus.messages[request];
        let ours = &views.messages[rpc.request().view()];
        let names: Vec<(u32, &str)> = bulky.iter().map(|n| (*n, theirs[n].ty.as_str())).collect();
        assert_eq!(names, [(5, "FieldData"), (6, "uint32")], "{}: {request}", rpc.name());
        assert!(bulky.iter().all(|n| theirs[n].repeated), "{}: bulky fields are repeated", rpc.name());
        assert!(bulky.iter().all(|n| !ours.contains_key(n)), "{}: the view reads a bulky field", rpc.name());
        checked += 1;
    }
    assert_eq!(checked, 2, "Insert and Upsert stream their rows");
}
