//! The tables `ebb ctl` prints: no borders, columns as wide as their longest cell, so a 64-char
//! node id is never cut (a long line wraps in the terminal rather than losing the id).

use comfy_table::{presets, Table};

/// A table with this header row.
pub fn with_header(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

pub fn print(table: &Table) {
    println!("{}", table.trim_fmt());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_64_char_node_id_is_printed_whole() {
        let id = "n".repeat(64);
        let mut table = with_header(&["NODE", "OK", "DETAIL"]);
        table.add_row(vec![id.as_str(), "ok", "a long detail that follows the id"]);
        let text = table.trim_fmt();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NODE"), "{text}");
        assert!(lines[1].starts_with(&format!("{id}  ok")), "{text}");
    }
}
