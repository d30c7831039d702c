//! Printing results: aligned columns for people, JSON for scripts. Every command builds its
//! rows as JSON objects once; the table is a view of them.

use std::io::{self, Write};

use serde_json::{Map, Value};

pub type Row = Map<String, Value>;

/// How a column's values look in a table (JSON always carries the raw value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    /// As is, cut at [`MAX_TEXT`] characters.
    Text,
    /// Right-aligned number; fractions with two decimals.
    Num,
    /// A fraction 0..1 shown as a percentage.
    Percent,
    /// An RFC 3339 time shown to the second.
    Time,
    /// `yes` / `no`.
    YesNo,
}

#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub key: &'static str,
    pub fmt: Fmt,
}

pub const fn col(header: &'static str, key: &'static str, fmt: Fmt) -> Column {
    Column { header, key, fmt }
}

/// The object `json!({...})` built.
pub fn object(value: Value) -> Row {
    match value {
        Value::Object(map) => map,
        other => Map::from_iter([("value".to_owned(), other)]),
    }
}

/// Longest text shown in a table cell; JSON has it all.
pub const MAX_TEXT: usize = 80;

/// The table text for `rows`: a header line, then one line per row, columns separated by
/// two spaces, numbers right-aligned. No trailing spaces.
pub fn table(rows: &[Row], columns: &[Column]) -> String {
    let cells: Vec<Vec<String>> =
        rows.iter().map(|row| columns.iter().map(|c| cell(row.get(c.key), c.fmt)).collect()).collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].chars().count()).chain([c.header.len()]).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    let headers: Vec<String> = columns.iter().map(|c| c.header.to_owned()).collect();
    for line in std::iter::once(&headers).chain(cells.iter()) {
        let mut text = String::new();
        for (i, (value, c)) in line.iter().zip(columns).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths[i] - value.chars().count();
            if matches!(c.fmt, Fmt::Num | Fmt::Percent) {
                text.extend(std::iter::repeat_n(' ', pad));
                text.push_str(value);
            } else {
                text.push_str(value);
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

/// `label: value` lines for one record, labels aligned.
pub fn record(row: &Row, columns: &[Column]) -> String {
    let width = columns.iter().map(|c| c.header.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in columns {
        let label = format!("{}:", c.header);
        out.push_str(format!("{label:<w$} {}", cell(row.get(c.key), c.fmt), w = width + 1).trim_end());
        out.push('\n');
    }
    out
}

fn cell(value: Option<&Value>, fmt: Fmt) -> String {
    let value = match value {
        None | Some(Value::Null) => return "-".into(),
        Some(v) => v,
    };
    match (fmt, value) {
        (Fmt::YesNo, Value::Bool(b)) => if *b { "yes" } else { "no" }.into(),
        (Fmt::Percent, Value::Number(n)) => format!("{:.1}%", n.as_f64().unwrap_or(0.0) * 100.0),
        (Fmt::Num, Value::Number(n)) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
        (Fmt::Time, Value::String(s)) => match s.split_once('.') {
            // 2025-01-31T12:00:00.123Z -> 2025-01-31T12:00:00Z
            Some((secs, _)) => format!("{secs}Z"),
            None => s.clone(),
        },
        (_, Value::String(s)) => clip(s),
        (_, other) => clip(&other.to_string()),
    }
}

/// One line, at most [`MAX_TEXT`] characters.
fn clip(s: &str) -> String {
    let one_line: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if one_line.chars().count() <= MAX_TEXT {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(MAX_TEXT - 1).collect();
    cut.push('…');
    cut
}

/// Writes `text` to standard output. A closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// A value as pretty JSON, with a final newline.
pub fn json_text(value: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    text
}

/// Prints `rows` as a table, or as a JSON array of objects.
pub fn print_rows(rows: &[Row], columns: &[Column], json: bool) -> io::Result<()> {
    if json { emit(&json_text(&rows)) } else { emit(&table(rows, columns)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(v: Value) -> Row {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn columns_align_and_numbers_sit_right() {
        let rows = [
            row(json!({"name": "search", "calls": 1200, "rate": 0.995, "ms": 12.345, "ok": true})),
            row(json!({"name": "insert", "calls": 7, "rate": 1.0, "ms": null, "ok": false})),
        ];
        let cols = [
            col("OPERATION", "name", Fmt::Text),
            col("CALLS", "calls", Fmt::Num),
            col("SUCCESS", "rate", Fmt::Percent),
            col("AVG_MS", "ms", Fmt::Num),
            col("OK", "ok", Fmt::YesNo),
        ];
        assert_eq!(
            table(&rows, &cols),
            "OPERATION  CALLS  SUCCESS  AVG_MS  OK\n\
             search      1200    99.5%   12.35  yes\n\
             insert         7   100.0%       -  no\n"
        );
    }

    #[test]
    fn long_text_is_clipped_to_one_line_and_times_to_the_second() {
        let long = "x".repeat(200);
        let rows = [row(json!({"t": "2025-01-31T12:00:00.123Z", "msg": format!("a\nb{long}")}))];
        let text = table(&rows, &[col("TIME", "t", Fmt::Time), col("MSG", "msg", Fmt::Text)]);
        let line = text.lines().nth(1).unwrap();
        assert!(line.starts_with("2025-01-31T12:00:00Z  a b"), "{line}");
        assert!(line.ends_with('…'));
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn records_align_their_labels() {
        let r = row(json!({"name": "alice", "active": true}));
        assert_eq!(
            record(&r, &[col("name", "name", Fmt::Text), col("active", "active", Fmt::YesNo)]),
            "name:   alice\nactive: yes\n"
        );
    }
}
