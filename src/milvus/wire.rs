//! Reading one string field of a protobuf message without decoding the rest: enough to
//! find the collection and database any request names, for methods that have no view.

/// The values of string field `number` in `msg`, in order (several if it is repeated).
/// None if `msg` is not well-formed protobuf.
pub fn strings(msg: &[u8], number: u32) -> Option<Vec<&str>> {
    fields(msg, [number]).map(|[values]| values)
}

/// The values of each of the string fields `numbers` in `msg`, read in one pass.
/// None if `msg` is not well-formed protobuf.
pub fn fields<const N: usize>(msg: &[u8], numbers: [u32; N]) -> Option<[Vec<&str>; N]> {
    let mut out = [const { Vec::new() }; N];
    let mut rest = msg;
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        let (field, wire_type) = ((key >> 3) as u32, key & 7);
        if field == 0 {
            return None; // no field has number 0: Milvus's protobuf reader refuses it too
        }
        match wire_type {
            0 => {
                varint(&mut rest)?;
            }
            1 => rest = rest.get(8..)?,
            2 => {
                let len = usize::try_from(varint(&mut rest)?).ok()?;
                let value = rest.get(..len)?;
                rest = &rest[len..];
                if let Some(i) = numbers.iter().position(|&n| n == field) {
                    out[i].push(std::str::from_utf8(value).ok()?);
                }
            }
            5 => rest = rest.get(4..)?,
            _ => return None, // groups (3, 4) are not used by Milvus; anything else is garbage
        }
    }
    Some(out)
}

/// Reads one base-128 varint from the front of `buf`, advancing it.
pub fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = *buf.get(i)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            *buf = &buf[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn finds_strings_among_other_fields() {
        let msg = crate::milvus::views::PartitionsRequest {
            db_name: "analytics".into(),
            collection_name: "docs".into(),
            partition_names: vec!["a".into(), "b".into()],
        }
        .encode_to_vec();
        assert_eq!(strings(&msg, 3), Some(vec!["docs"]));
        assert_eq!(strings(&msg, 2), Some(vec!["analytics"]));
        assert_eq!(strings(&msg, 4), Some(vec!["a", "b"]));
        assert_eq!(strings(&msg, 9), Some(vec![]));
        assert_eq!(fields(&msg, [2, 3, 9]), Some([vec!["analytics"], vec!["docs"], vec![]]));
        // Varint, fixed64 and fixed32 fields are skipped.
        let mixed = [0x08, 0x96, 0x01, 0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0x1d, 0, 0, 0, 0, 0x1a, 0x01, b'x'];
        assert_eq!(strings(&mixed, 3), Some(vec!["x"]));
    }

    #[test]
    fn malformed_input_is_none_not_a_panic() {
        assert_eq!(strings(&[0x1a, 0x05, b'a'], 3), None, "length past the end");
        assert_eq!(strings(&[0x1a], 3), None, "key without a value");
        assert_eq!(strings(&[0xff; 11], 3), None, "endless varint");
        assert_eq!(strings(&[0x02, 0x01, b'a'], 3), None, "field number 0");
        assert_eq!(strings(&[0x1a, 0x02, 0xff, 0xfe], 3), None, "not UTF-8");
        assert_eq!(fields(&[0x12, 0x01, b'a', 0x1a], [2, 3]), None, "key without a value after a good field");
    }
}
