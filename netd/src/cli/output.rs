//! Output for people (aligned tables) and for scripts (`--json`).

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

/// Prints `rows` under `headers` as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render(headers, rows));
}

/// `rows` under `headers`, each column as wide as its widest cell, two spaces apart.
fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            // Padded by hand: a format width is at most 65,535, and a cell listing thousands
            // of published ports is wider.
            .map(|(c, w)| format!("{c}{}", " ".repeat(w.saturating_sub(c.len()))))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Prints `value` as pretty JSON.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Standard output, buffered, for what is printed a piece at a time.
pub type Stream = std::io::BufWriter<std::io::StdoutLock<'static>>;

pub fn stream() -> Stream {
    std::io::BufWriter::new(std::io::stdout().lock())
}

/// A JSON array written an element at a time, for lists too long to hold.
#[derive(Default)]
pub struct JsonArray {
    elements: usize,
}

impl JsonArray {
    pub fn push<T: Serialize>(&mut self, out: &mut impl Write, element: &T) -> Result<()> {
        out.write_all(if self.elements == 0 {
            b"[\n  "
        } else {
            b",\n  "
        })?;
        serde_json::to_writer(&mut *out, element)?;
        self.elements += 1;
        Ok(())
    }

    pub fn finish(self, out: &mut impl Write) -> Result<()> {
        out.write_all(if self.elements == 0 {
            b"[]\n"
        } else {
            b"\n]\n"
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_its_columns_however_wide_a_cell() {
        let wide = "p".repeat(70_000);
        let rows = vec![
            vec!["a".to_string(), wide.clone()],
            vec!["bbb".into(), "x".into()],
        ];
        let text = render(&["NAME", "PORTS"], &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME  PORTS");
        assert_eq!(lines[1], format!("a     {wide}"));
        assert_eq!(lines[2], "bbb   x");
    }
}
