//! Reading the top level of a protobuf message while its bytes stream past, keeping every
//! field except the bulky ones named by the caller (an insert's rows).
//!
//! What is kept, the *sketch*, is itself a valid message: the original encoding of the
//! kept fields, in order. A view that does not declare the skipped fields reads the
//! sketch exactly as it would read the whole message, so a 4 MiB insert can be checked
//! and recorded from a few dozen bytes while the rest goes upstream unbuffered.

/// Longest varint protobuf allows (a u64 in 7-bit groups).
const MAX_VARINT: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a field's key; its bytes collect in `head`.
    Key,
    /// Reading a varint value (kept).
    Varint,
    /// Bytes left of a fixed-size value (kept).
    Fixed(usize),
    /// Reading the length of a length-delimited field; key and length collect in `head`.
    Length { skip: bool },
    /// Bytes left of a length-delimited value that is kept.
    Keep(usize),
    /// Bytes left of a length-delimited value that is skipped.
    Skip(usize),
}

pub struct Scan {
    /// Length-delimited fields passed over rather than kept.
    skipped: &'static [u32],
    /// Bytes of the message not yet seen.
    left: usize,
    state: State,
    /// A key (and length) whose field is not yet known to be kept.
    head: Vec<u8>,
    /// Bytes of the varint being read.
    varint_len: usize,
    sketch: Vec<u8>,
}

impl Scan {
    /// A scan of a message of `len` bytes, passing over length-delimited fields whose
    /// number is in `skipped`.
    pub fn new(len: usize, skipped: &'static [u32]) -> Self {
        Scan { skipped, left: len, state: State::Key, head: Vec::new(), varint_len: 0, sketch: Vec::new() }
    }

    /// Reads the next bytes of the message. Bytes past its end are not looked at (a unary
    /// request has one message; what follows it is not ours to judge).
    pub fn feed(&mut self, data: &[u8]) -> Result<(), Malformed> {
        let mut rest = &data[..data.len().min(self.left)];
        while !rest.is_empty() {
            let used = match self.state {
                State::Key | State::Varint | State::Length { .. } => self.varint_byte(rest[0])?,
                State::Fixed(n) | State::Keep(n) => {
                    let k = n.min(rest.len());
                    self.sketch.extend_from_slice(&rest[..k]);
                    self.state = if k == n { State::Key } else { self.state.less(k) };
                    k
                }
                State::Skip(n) => {
                    let k = n.min(rest.len());
                    self.state = if k == n { State::Key } else { State::Skip(n - k) };
                    k
                }
            };
            rest = &rest[used..];
            self.left -= used;
        }
        if self.left == 0 && !self.at_boundary() {
            return Err(Malformed("the message ends inside a field"));
        }
        Ok(())
    }

    /// Whether every byte of the message has been read.
    pub fn is_done(&self) -> bool {
        self.left == 0
    }

    /// Whether the scan is inside a field it passes over, waiting for more of it.
    pub fn is_skipping(&self) -> bool {
        matches!(self.state, State::Skip(_))
    }

    /// The kept fields so far, a message in its own right.
    pub fn sketch(&self) -> &[u8] {
        &self.sketch
    }

    pub fn into_sketch(self) -> Vec<u8> {
        self.sketch
    }

    fn at_boundary(&self) -> bool {
        self.state == State::Key && self.head.is_empty()
    }

    /// One byte of a key, varint value or length. Returns the bytes used (1).
    fn varint_byte(&mut self, byte: u8) -> Result<usize, Malformed> {
        self.varint_len += 1;
        if self.varint_len > MAX_VARINT {
            return Err(Malformed("a varint is longer than 10 bytes"));
        }
        let last = byte < 0x80;
        match self.state {
            State::Varint => {
                self.sketch.push(byte);
                if last {
                    self.state = State::Key;
                }
            }
            State::Key => {
                self.head.push(byte);
                if last {
                    self.start_field()?;
                }
            }
            State::Length { skip } => {
                self.head.push(byte);
                if last {
                    let key_len = self.head.len() - self.varint_len;
                    let len = varint(&self.head[key_len..]);
                    // `left` still counts this byte.
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&n| n < self.left)
                        .ok_or(Malformed("a field's length runs past the end of the message"))?;
                    if skip {
                        self.state = State::Skip(len);
                    } else {
                        self.sketch.extend_from_slice(&self.head);
                        self.state = State::Keep(len);
                    }
                    self.head.clear();
                    if len == 0 {
                        self.state = State::Key;
                    }
                }
            }
            _ => unreachable!("only varint states read varint bytes"),
        }
        if last {
            self.varint_len = 0;
        }
        Ok(1)
    }

    /// The key in `head` is complete: decide how its value is read.
    fn start_field(&mut self) -> Result<(), Malformed> {
        let key = varint(&self.head);
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return Err(Malformed("a field number is out of range"));
        }
        let state = match key & 7 {
            0 => State::Varint,
            1 => State::Fixed(8),
            5 => State::Fixed(4),
            2 => {
                let skip = self.skipped.contains(&(number as u32));
                self.state = State::Length { skip };
                return Ok(()); // the key stays in `head` until the length decides
            }
            _ => return Err(Malformed("a field has a wire type protobuf does not use here")),
        };
        self.sketch.extend_from_slice(&self.head);
        self.head.clear();
        self.state = state;
        Ok(())
    }
}

impl State {
    /// The same state with `k` fewer bytes left.
    fn less(self, k: usize) -> State {
        match self {
            State::Fixed(n) => State::Fixed(n - k),
            State::Keep(n) => State::Keep(n - k),
            State::Skip(n) => State::Skip(n - k),
            other => other,
        }
    }
}

/// The value of a complete varint (its last byte below 0x80; at most 10 bytes).
fn varint(bytes: &[u8]) -> u64 {
    bytes.iter().rev().fold(0, |value, b| (value << 7) | u64::from(b & 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message: 2:"db" 3:"docs" 5:<300 bytes> 4:"" 7:varint 1:fixed64 5:<2 bytes> 8:fixed32
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let mut full = Vec::new();
        let mut kept = Vec::new();
        let mut both = |bytes: &[u8], keep: bool| {
            full.extend_from_slice(bytes);
            if keep {
                kept.extend_from_slice(bytes);
            }
        };
        both(&[0x12, 2, b'd', b'b'], true);
        both(&[0x1a, 4, b'd', b'o', b'c', b's'], true);
        both(&[0x2a, 0xac, 0x02], false); // field 5, length 300
        both(&[7u8; 300], false);
        both(&[0x22, 0], true);
        both(&[0x38, 0xe8, 0x07], true); // field 7 = 1000
        both(&[0x09, 1, 2, 3, 4, 5, 6, 7, 8], true);
        both(&[0x2a, 2, 0xff, 0xfe], false);
        both(&[0x45, 9, 9, 9, 9], true);
        (full, kept)
    }

    #[test]
    fn sketch_is_the_message_without_the_skipped_fields_however_it_is_split() {
        let (full, kept) = sample();
        for chunk in [1, 2, 3, 7, 64, full.len()] {
            let mut scan = Scan::new(full.len(), &[5, 6]);
            for piece in full.chunks(chunk) {
                assert!(!scan.is_done());
                scan.feed(piece).unwrap();
            }
            assert!(scan.is_done(), "chunks of {chunk}");
            assert_eq!(scan.sketch(), &kept[..], "chunks of {chunk}");
        }
    }

    #[test]
    fn knows_when_it_waits_inside_a_skipped_field() {
        let (full, _) = sample();
        let mut scan = Scan::new(full.len(), &[5]);
        scan.feed(&full[..20]).unwrap();
        assert!(scan.is_skipping());
        assert_eq!(scan.sketch(), &full[..10], "db and collection were read before the rows");
        let mut nothing_skipped = Scan::new(full.len(), &[]);
        nothing_skipped.feed(&full[..20]).unwrap();
        assert!(!nothing_skipped.is_skipping());
    }

    #[test]
    fn bytes_after_the_message_are_not_read() {
        let (mut full, kept) = sample();
        let len = full.len();
        full.extend_from_slice(&[0xff; 5]);
        let mut scan = Scan::new(len, &[5]);
        scan.feed(&full).unwrap();
        assert!(scan.is_done());
        assert_eq!(scan.into_sketch(), kept);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let cases: [(&[u8], &str); 5] = [
            (&[0x08, 0x96], "ends inside"),
            (&[0x2a, 9, 0, 0], "past the end"),
            (&[0x0b, 0], "wire type"),
            (&[0x02, 0], "out of range"),
            (&[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], "longer than 10"),
        ];
        for (msg, why) in cases {
            let mut scan = Scan::new(msg.len(), &[5]);
            let err = scan.feed(msg).expect_err(why);
            assert!(err.0.contains(why), "{why}: {err}");
        }
    }

    /// Encodes a field: key, then its value as its wire type wants.
    fn field(number: u32, wire: u8, payload: &[u8], out: &mut Vec<u8>) {
        let put_varint = |mut v: u64, out: &mut Vec<u8>| {
            while v >= 0x80 {
                out.push(v as u8 | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        };
        put_varint(u64::from(number) << 3 | u64::from(wire), out);
        match wire {
            0 => put_varint(payload.iter().fold(0, |v, b| v << 8 | u64::from(*b)), out),
            1 => out.extend_from_slice(&[payload.first().copied().unwrap_or(0); 8]),
            5 => out.extend_from_slice(&[payload.first().copied().unwrap_or(0); 4]),
            _ => {
                put_varint(payload.len() as u64, out);
                out.extend_from_slice(payload);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_message_split_anywhere_gives_the_message_without_its_skipped_fields(
            fields in proptest::collection::vec(
                (1u32..12, proptest::sample::select(vec![0u8, 1, 2, 5]), proptest::collection::vec(proptest::num::u8::ANY, 0..300)),
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..4000, 0..6),
        ) {
            let skipped: &'static [u32] = &[5, 6];
            let (mut full, mut kept) = (Vec::new(), Vec::new());
            for (number, wire, payload) in &fields {
                let payload = &payload[..payload.len().min(if *wire == 0 { 8 } else { 300 })];
                let mut encoded = Vec::new();
                field(*number, *wire, payload, &mut encoded);
                full.extend_from_slice(&encoded);
                if !(*wire == 2 && skipped.contains(number)) {
                    kept.extend_from_slice(&encoded);
                }
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(full.len())).collect();
            cuts.sort_unstable();
            let mut scan = Scan::new(full.len(), skipped);
            let mut from = 0;
            for cut in cuts.into_iter().chain([full.len()]) {
                scan.feed(&full[from..cut]).unwrap();
                from = cut;
            }
            proptest::prop_assert!(scan.is_done());
            proptest::prop_assert_eq!(scan.into_sketch(), kept);
        }

        #[test]
        fn garbage_is_refused_or_read_never_a_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), cut in 0usize..200) {
            let mut scan = Scan::new(bytes.len(), &[5]);
            let cut = cut.min(bytes.len());
            let _ = scan.feed(&bytes[..cut]).and_then(|()| scan.feed(&bytes[cut..]));
            proptest::prop_assert!(scan.sketch().len() <= bytes.len());
        }
    }
}
