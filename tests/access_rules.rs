//! Every method of Milvus's `MilvusService` (read from the `.proto` shipped in the
//! milvus-sdk-rust crate, not copied here) has an access rule, and the rules find the
//! collection where Milvus's own requests put it.

use std::collections::HashMap;

use milvus_sidecar::milvus::access::{self, Access};

mod common;

fn milvus_proto() -> String {
    let path = common::milvus_proto_dir().join("milvus.proto");
    let text = std::fs::read_to_string(path).unwrap();
    // Comments out: they may hold braces and field-like text.
    let mut plain = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("/*") {
        plain.push_str(&rest[..start]);
        rest = rest[start..].find("*/").map_or("", |end| &rest[start + end + 2..]);
    }
    plain.push_str(rest);
    plain.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n")
}

/// The text between the braces of the top-level block that starts with `header`.
fn block<'a>(text: &'a str, header: &str) -> Option<&'a str> {
    let start = text.find(header)? + header.len();
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// rpc name -> request message name, for MilvusService only.
fn service_methods(text: &str) -> HashMap<String, String> {
    let service = block(text, "service MilvusService {").expect("MilvusService is defined");
    service
        .split("rpc ")
        .skip(1)
        .map(|decl| {
            let name = decl.split('(').next().unwrap().trim().to_string();
            let request = decl.split('(').nth(1).unwrap().split(')').next().unwrap().trim();
            let request = request.trim_start_matches("stream ").rsplit('.').next().unwrap().to_string();
            (name, request)
        })
        .collect()
}

/// Field number -> (type, repeated) of a top-level message, and its privilege option's
/// (object_type, object_name_index) if it has one.
/// Field number -> (type, repeated).
type Fields = HashMap<u32, (String, bool)>;

/// None for a message defined in another file (feder.proto's segment-level ones).
fn message(text: &str, name: &str) -> Option<(Fields, Option<(String, i64)>)> {
    let body = block(text, &format!("\nmessage {name} {{")).or_else(|| block(text, &format!("\nmessage {name}{{")))?;
    let mut fields = HashMap::new();
    for statement in without_nested_blocks(body).split(';') {
        let s = statement.trim();
        if let Some((decl, number)) = s.rsplit_once('=')
            && let Ok(number) = number.split_whitespace().next().unwrap_or("").parse::<u32>()
        {
            let words: Vec<&str> = decl.split_whitespace().collect();
            let repeated = words.first() == Some(&"repeated");
            let ty = words.iter().rev().nth(1).copied().unwrap_or("").to_string();
            fields.insert(number, (ty, repeated));
        }
    }
    let option = body.find("object_type:").map(|i| {
        let after = &body[i + "object_type:".len()..];
        let object_type = after.split_whitespace().next().unwrap().to_string();
        // `object_name_indexs` (sic) is Milvus's spelling for a repeated name field.
        let index = ["object_name_index:", "object_name_indexs:"]
            .iter()
            .find_map(|key| body.find(key).map(|j| &body[j + key.len()..]))
            .and_then(|after| after.split_whitespace().next()?.trim_end_matches('}').parse().ok())
            .unwrap_or(-1);
        (object_type, index)
    });
    Some((fields, option))
}

/// `body` without the contents of nested blocks (nested messages, enums, oneofs keep
/// their fields in the same numbering only for oneofs, which Milvus requests do not use
/// for names).
fn without_nested_blocks(body: &str) -> String {
    let mut out = String::with_capacity(body.len());
    let mut depth = 0;
    for c in body.chars() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                out.push(';');
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[test]
fn every_method_of_the_milvus_service_has_a_rule() {
    let text = milvus_proto();
    let methods = service_methods(&text);
    assert!(methods.len() > 140, "found only {} methods", methods.len());
    let missing: Vec<&String> = methods.keys().filter(|m| access::rule(m).is_none()).collect();
    assert!(missing.is_empty(), "methods without an access rule: {missing:?}");
    let stale: Vec<&&str> = access::KNOWN.iter().filter(|m| !methods.contains_key(**m)).collect();
    assert!(stale.is_empty(), "rules for methods Milvus does not have: {stale:?}");
}

#[test]
fn collection_rules_read_the_field_milvus_names_the_collection_in() {
    let text = milvus_proto();
    let mut problems = Vec::new();
    for (method, request) in service_methods(&text) {
        let Some(rule) = access::rule(&method) else { continue };
        let Some((fields, option)) = message(&text, &request) else {
            if matches!(rule.access, Access::Collection { .. }) {
                problems.push(format!("{method}: request {request} not found to check the collection field"));
            }
            continue;
        };
        match rule.access {
            Access::Collection { target, .. } => {
                match fields.get(&target.collection_field) {
                    Some((ty, repeated)) if ty == "string" && *repeated == target.repeated => {}
                    other => {
                        problems.push(format!("{method}: collection field {} is {other:?}", target.collection_field))
                    }
                }
                if target.database_field != 0
                    && fields.get(&target.database_field).map(|f| f.0.as_str()) != Some("string")
                {
                    problems.push(format!("{method}: database field {} is not a string", target.database_field));
                }
                // Where Milvus itself scopes the privilege to a collection, it says which field.
                if let Some((object_type, index)) = option
                    && object_type == "Collection"
                    && index != target.collection_field as i64
                {
                    problems.push(format!(
                        "{method}: Milvus names the collection at {index}, the rule reads {}",
                        target.collection_field
                    ));
                }
            }
            Access::Public | Access::Global | Access::CreateCollection => {
                // A method Milvus scopes to a collection must not be treated as global.
                if let Some((object_type, _)) = &option
                    && object_type == "Collection"
                {
                    problems.push(format!("{method}: Milvus scopes it to a collection, the rule does not"));
                }
            }
        }
    }
    problems.sort();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
