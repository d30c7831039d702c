//! Filtering a `ShowCollectionsResponse` down to the collections the caller may see, at
//! the wire level: the arrays that run parallel to `collection_names` (ids, timestamps,
//! load percentages, availability, shards) are cut the same way, and every other field,
//! known to this build or not, is copied through untouched.

/// `collection_names`, and the fields that hold one value per collection.
use crate::milvus::wire::varint;

const NAMES: u32 = 2;
const PARALLEL: &[u32] = &[3, 4, 5, 6, 7, 8];

/// Rewrites `msg` keeping only the collections for which `keep(name)` holds. None if `msg`
/// is not well-formed protobuf.
pub fn filter_show_collections(msg: &[u8], keep: impl Fn(&str) -> bool) -> Option<Vec<u8>> {
    let fields = parse(msg)?;
    let kept: Vec<bool> = fields
        .iter()
        .filter(|f| f.number == NAMES)
        .map(|f| std::str::from_utf8(f.payload).map(&keep))
        .collect::<Result<_, _>>()
        .ok()?;
    let mut out = Vec::with_capacity(msg.len());
    let mut name_index = 0;
    // Values of each parallel field, in order, gathered from packed and unpacked forms.
    let mut parallel: Vec<(u32, Vec<u64>, u8)> = Vec::new();
    for field in &fields {
        if field.number == NAMES {
            if kept[name_index] {
                out.extend_from_slice(field.raw);
            }
            name_index += 1;
        } else if PARALLEL.contains(&field.number) {
            let values = match field.wire_type {
                0 => vec![field.varint],
                2 => unpack(field.payload)?,
                _ => return None,
            };
            match parallel.iter_mut().find(|(n, _, _)| *n == field.number) {
                Some((_, all, _)) => all.extend(values),
                None => parallel.push((field.number, values, field.wire_type)),
            }
        } else {
            out.extend_from_slice(field.raw);
        }
    }
    for (number, values, _) in parallel {
        // A parallel array of another length is not what we think it is: keep it whole
        // rather than misalign it.
        let filtered: Vec<u64> = if values.len() == kept.len() {
            values.into_iter().zip(&kept).filter(|(_, k)| **k).map(|(v, _)| v).collect()
        } else {
            values
        };
        if filtered.is_empty() {
            continue;
        }
        let mut packed = Vec::new();
        for v in &filtered {
            put_varint(&mut packed, *v);
        }
        put_varint(&mut out, u64::from(number << 3 | 2));
        put_varint(&mut out, packed.len() as u64);
        out.extend_from_slice(&packed);
    }
    Some(out)
}

struct Field<'a> {
    number: u32,
    wire_type: u8,
    /// The whole field as it was encoded (key included).
    raw: &'a [u8],
    /// Length-delimited contents.
    payload: &'a [u8],
    varint: u64,
}

fn parse(msg: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut fields = Vec::new();
    let mut rest = msg;
    while !rest.is_empty() {
        let start = rest;
        let key = varint(&mut rest)?;
        let (number, wire_type) = ((key >> 3) as u32, (key & 7) as u8);
        let (mut payload, mut value) = (&[][..], 0);
        match wire_type {
            0 => value = varint(&mut rest)?,
            1 => rest = rest.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut rest)?).ok()?;
                payload = rest.get(..len)?;
                rest = &rest[len..];
            }
            5 => rest = rest.get(4..)?,
            _ => return None,
        }
        let raw = &start[..start.len() - rest.len()];
        fields.push(Field { number, wire_type, raw, payload, varint: value });
    }
    Some(fields)
}

fn unpack(mut packed: &[u8]) -> Option<Vec<u64>> {
    let mut values = Vec::new();
    while !packed.is_empty() {
        values.push(varint(&mut packed)?);
    }
    Some(values)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ShowCollectionsResponse with a field this build does not know (99).
    fn reply() -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&[0x0a, 0x02, 0x18, 0x00]); // status { code: 0 }
        for name in ["a", "secret", "c"] {
            m.push(0x12);
            m.push(name.len() as u8);
            m.extend_from_slice(name.as_bytes());
        }
        m.extend_from_slice(&[0x1a, 0x03, 11, 12, 13]); // collection_ids, packed
        m.extend_from_slice(&[0x20, 21, 0x20, 22, 0x20, 23]); // created_timestamps, unpacked
        m.extend_from_slice(&[0x3a, 0x03, 1, 0, 1]); // query_service_available, packed
        m.extend_from_slice(&[0x9a, 0x06, 0x01, b'z']); // field 99, kept as is
        m
    }

    #[test]
    fn hidden_collections_disappear_from_every_parallel_array() {
        let out = filter_show_collections(&reply(), |name| name != "secret").unwrap();
        let fields = parse(&out).unwrap();
        let names: Vec<&[u8]> = fields.iter().filter(|f| f.number == 2).map(|f| f.payload).collect();
        assert_eq!(names, vec![&b"a"[..], &b"c"[..]]);
        let array = |n: u32| fields.iter().find(|f| f.number == n).map(|f| unpack(f.payload).unwrap());
        assert_eq!(array(3), Some(vec![11, 13]));
        assert_eq!(array(4), Some(vec![21, 23]), "unpacked input is cut too (and packed on output)");
        assert_eq!(array(7), Some(vec![1, 1]));
        assert!(fields.iter().any(|f| f.number == 1), "status kept");
        assert!(fields.iter().any(|f| f.number == 99 && f.payload == b"z"), "unknown fields kept");
    }

    #[test]
    fn keeping_everything_keeps_every_value_and_garbage_is_refused() {
        let out = filter_show_collections(&reply(), |_| true).unwrap();
        let fields = parse(&out).unwrap();
        assert_eq!(fields.iter().filter(|f| f.number == 2).count(), 3);
        assert_eq!(unpack(fields.iter().find(|f| f.number == 3).unwrap().payload).unwrap(), vec![11, 12, 13]);
        assert_eq!(filter_show_collections(&[0x12, 0x09, b'x'], |_| true), None);
    }
}
