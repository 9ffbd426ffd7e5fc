//! Output for people (aligned tables) and for scripts (`--json`).

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

/// Prints `rows` under `headers` as an aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
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
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
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
