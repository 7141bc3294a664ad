//! Offline files in: the rows of a CSV or JSON-lines file, each checked against its import
//! definition's column types, and the event each row makes (its id made of the file's hash and
//! row number, so a row applied twice is a duplicate). Pure: the server reads the file and
//! sends the events through the pipeline.

use crate::event::Event;
use crate::model::{FieldType, ImportDef};
use crate::value::json_kind_phrase;

/// One row of the file, by its number (1 = first data row) and the file line it starts on.
pub struct Row {
    pub number: i64,
    pub line: u64,
    pub fields: Result<serde_json::Map<String, serde_json::Value>, String>,
}

/// A row as the event the definition makes of it.
pub fn to_event(
    def: &ImportDef,
    file_sha256: &str,
    row: i64,
    mut fields: serde_json::Map<String, serde_json::Value>,
    now: i64,
) -> Result<Event, String> {
    let visitor_id = match fields.get(&def.key) {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        None | Some(serde_json::Value::Null) => return Err(format!("{}: missing (the visitor id to match)", def.key)),
        Some(serde_json::Value::String(_)) => return Err(format!("{}: empty (the visitor id to match)", def.key)),
        Some(other) => return Err(format!("{}: expected a string, found {}", def.key, json_kind_phrase(other))),
    };
    let timestamp_ms = match &def.timestamp {
        Some(column) => match fields.get(column).and_then(|v| v.as_str()) {
            // History of any age is what imports are for; a row dated in the future is applied
            // at the time it is imported, as an event sent ahead of its receipt would be.
            Some(s) => {
                crate::time::parse_rfc3339(s).ok_or_else(|| format!("{column}: `{s}` is not RFC 3339"))?.min(now)
            }
            None => return Err(format!("{column}: missing (the row's time)")),
        },
        None => now,
    };
    let mut data = serde_json::Map::new();
    for (column, _) in &def.columns {
        if let Some(v) = fields.remove(column).filter(|v| !v.is_null()) {
            data.insert(column.clone(), v);
        }
    }
    data.insert(def.key.clone(), serde_json::Value::String(visitor_id.clone()));
    Ok(Event {
        id: Some(format!("import:{}:{}:{row}", def.name, &file_sha256[..16])),
        name: def.event.clone(),
        visitor_id,
        source: Some(format!("import:{}", def.name)),
        timestamp_ms,
        data,
    })
}

/// The rows of a CSV file, parsed as they are taken; the header is checked first.
pub fn csv_rows<'a>(
    def: &'a ImportDef,
    body: &'a [u8],
    first_row: i64,
) -> Result<Box<dyn Iterator<Item = Row> + Send + 'a>, String> {
    let mut reader = csv::ReaderBuilder::new().flexible(false).from_reader(body);
    let headers = reader
        .headers()
        .map_err(|e| format!("CSV header: {e}"))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect::<Vec<_>>();
    if !headers.contains(&def.key) {
        return Err(format!(
            "CSV header has no `{}` column (the visitor id to match); it has: {}",
            def.key,
            headers.join(", ")
        ));
    }
    let rows = reader.into_records().enumerate().map(move |(i, record)| {
        let number = first_row + i as i64;
        let (line, fields) = match record {
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (line, Err(format!("malformed CSV: {}", strip_csv_position(&e.to_string()))))
            }
            Ok(record) => {
                let line = record.position().map_or(0, |p| p.line());
                let mut fields = serde_json::Map::new();
                let mut problem = None;
                for (header, cell) in headers.iter().zip(record.iter()) {
                    let ty = if *header == def.key {
                        Some(FieldType::String)
                    } else {
                        def.columns.iter().find(|(c, _)| c == header).map(|(_, t)| *t)
                    };
                    let Some(ty) = ty else { continue };
                    match typed_cell(cell, ty) {
                        Ok(Some(v)) => {
                            fields.insert(header.clone(), v);
                        }
                        Ok(None) => {}
                        Err(m) => {
                            problem.get_or_insert(format!("{header}: {m}"));
                        }
                    }
                }
                (line, problem.map_or(Ok(fields), Err))
            }
        };
        Row { number, line, fields }
    });
    Ok(Box::new(rows))
}

/// A csv error's message without its trailing position (the summary names the row and line).
fn strip_csv_position(message: &str) -> String {
    message.split(" (line").next().unwrap_or(message).to_string()
}

/// A CSV cell as a value of the column's type; an empty cell is no value.
fn typed_cell(cell: &str, ty: FieldType) -> Result<Option<serde_json::Value>, String> {
    let cell = cell.trim();
    if cell.is_empty() {
        return Ok(None);
    }
    let value = match ty {
        FieldType::String => serde_json::Value::String(cell.to_string()),
        FieldType::Timestamp => {
            crate::time::parse_rfc3339(cell).ok_or_else(|| format!("`{cell}` is not an RFC 3339 timestamp"))?;
            serde_json::Value::String(cell.to_string())
        }
        FieldType::Number => cell
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number)
            .ok_or_else(|| format!("`{cell}` is not a number"))?,
        FieldType::Integer => {
            serde_json::Value::from(cell.parse::<i64>().map_err(|_| format!("`{cell}` is not an integer"))?)
        }
        FieldType::Boolean => match cell.to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => serde_json::Value::Bool(true),
            "false" | "no" | "0" => serde_json::Value::Bool(false),
            _ => return Err(format!("`{cell}` is not a boolean (true/false)")),
        },
        FieldType::Array | FieldType::Object => {
            let v: serde_json::Value =
                serde_json::from_str(cell).map_err(|_| format!("`{cell}` is not JSON {}", ty.name()))?;
            if !ty.matches(&v) {
                return Err(format!("expected {}, found {}", ty.name(), json_kind_phrase(&v)));
            }
            v
        }
    };
    Ok(Some(value))
}

/// The rows of a JSON-lines file (blank lines skipped), parsed as they are taken.
pub fn jsonl_rows<'a>(
    def: &'a ImportDef,
    body: &'a [u8],
    first_row: i64,
) -> Result<Box<dyn Iterator<Item = Row> + Send + 'a>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("JSON lines: not UTF-8: {e}"))?;
    let lines = text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty());
    let rows = lines.zip(first_row..).map(move |((i, line), number)| {
        let fields = match serde_json::from_str::<serde_json::Value>(line) {
            Err(e) => Err(format!("malformed JSON at column {}: {}", e.column(), crate::ingest::strip_position(&e))),
            Ok(serde_json::Value::Object(obj)) => check_object(def, obj),
            Ok(other) => Err(format!("expected an object, found {}", json_kind_phrase(&other))),
        };
        Row { number, line: i as u64 + 1, fields }
    });
    Ok(Box::new(rows))
}

fn check_object(
    def: &ImportDef,
    obj: serde_json::Map<String, serde_json::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    for (column, ty) in &def.columns {
        if let Some(v) = obj.get(column).filter(|v| !v.is_null())
            && !ty.matches(v)
        {
            return Err(format!("{column}: expected {}, found {}", ty.name(), json_kind_phrase(v)));
        }
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> ImportDef {
        ImportDef {
            name: "store".into(),
            event: "store_purchase".into(),
            matches: "email_hash".into(),
            key: "email_hash".into(),
            columns: vec![
                ("amount".into(), FieldType::Number),
                ("bought_at".into(), FieldType::Timestamp),
                ("store".into(), FieldType::String),
            ],
            timestamp: Some("bought_at".into()),
        }
    }

    #[test]
    fn csv_rows_are_typed_and_bad_rows_named() {
        let body = b"email_hash,amount,bought_at,store,ignored\n\
            h1,12.5,2024-05-01T10:00:00Z,Oslo,x\n\
            h2,lots,2024-05-01T10:00:00Z,Oslo,x\n\
            h3,3,yesterday,Oslo,x\n\
            ,3,2024-05-01T10:00:00Z,Oslo,x\n";
        let def = def();
        let rows = csv_rows(&def, body, 1).unwrap();
        let events: Vec<Result<Event, String>> =
            rows.into_iter().map(|r| r.fields.and_then(|f| to_event(&def, &"ab".repeat(32), r.number, f, 0))).collect();
        let first = events[0].as_ref().unwrap();
        assert_eq!(first.visitor_id, "h1");
        assert_eq!(first.data["amount"], serde_json::json!(12.5));
        assert!(!first.data.contains_key("ignored"));
        assert_eq!(first.id.as_deref(), Some("import:store:abababababababab:1"));
        assert_eq!(events[1].as_ref().unwrap_err(), "amount: `lots` is not a number");
        assert_eq!(events[2].as_ref().unwrap_err(), "bought_at: `yesterday` is not an RFC 3339 timestamp");
        assert_eq!(events[3].as_ref().unwrap_err(), "email_hash: missing (the visitor id to match)");
        assert!(matches!(csv_rows(&def, b"id,amount\n1,2\n", 1), Err(m) if m.contains("no `email_hash` column")));
    }

    #[test]
    fn json_lines_are_checked_per_line() {
        let body = b"{\"email_hash\":\"h1\",\"amount\":3,\"bought_at\":\"2024-05-01T10:00:00Z\"}\n\n{\"email_hash\":\"h2\",\"amount\":\"3\"}\n{oops\n";
        let def = def();
        let rows: Vec<Row> = jsonl_rows(&def, body, 10).unwrap().collect();
        assert_eq!(rows.iter().map(|r| (r.number, r.line)).collect::<Vec<_>>(), vec![(10, 1), (11, 3), (12, 4)]);
        assert!(rows[0].fields.is_ok());
        assert_eq!(rows[1].fields.as_ref().unwrap_err(), "amount: expected number, found a string");
        assert!(rows[2].fields.as_ref().unwrap_err().starts_with("malformed JSON at column 2"));
    }
}
