//! Named parameters in SQL text: found while skipping what each database reads as
//! something else, and compiled to the backend's placeholders. Values are always
//! bound, never written into the SQL.
//!
//! Skipped, per backend (a `:name` there stays as written):
//!
//! - everywhere: `-- …` and `/* … */` comments, `"…"` (a string on MySQL/MariaDB,
//!   an identifier elsewhere), `::` (PostgreSQL casts);
//! - PostgreSQL: `'…'` where only `''` escapes a quote (`standard_conforming_strings`,
//!   on by default since 9.1: a backslash is a plain character), `E'…'` where a
//!   backslash escapes too, dollar quotes `$$…$$` and `$tag$…$tag$`, nested block
//!   comments, and the `lo:hi` of an array slice `arr[lo:hi]` (a colon right after
//!   an expression inside `[…]`: write `arr[:lo : :hi]` to bind both bounds);
//! - MySQL/MariaDB: `'…'` and `"…"` with backslash escapes (the default SQL mode,
//!   without `NO_BACKSLASH_ESCAPES`), `` `…` `` identifiers, `# …` comments, and `--`
//!   only when followed by a space or control character;
//! - SQLite: `'…'` where only `''` escapes a quote, `` `…` `` and `[…]` identifiers.

use crate::db::Backend;

/// A named parameter in SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// `:name` (or a built-in such as `:$now`).
    Param(String),
    /// `:step.column`: a column of the first row of an earlier step.
    Column(String, String),
}

/// SQL compiled for one backend: the text with placeholders, and what each binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// The SQL with `?` or `$n`.
    pub sql: String,
    /// What to bind, in placeholder order (`$n` reuses one binding per name).
    pub binds: Vec<Placeholder>,
}

/// The named parameters of `sql` as `backend` reads it, in order of appearance.
pub fn parse_names(sql: &str, backend: Backend) -> Result<Vec<Placeholder>, String> {
    Ok(scan(sql, backend)?.into_iter().map(|(_, _, p)| p).collect())
}

/// Compiles `sql` for `backend`.
pub fn compile(sql: &str, backend: Backend) -> Result<Compiled, String> {
    let found = scan(sql, backend)?;
    let mut out = String::with_capacity(sql.len());
    let mut binds: Vec<Placeholder> = Vec::new();
    let mut last = 0;
    for (start, end, ph) in found {
        out.push_str(&sql[last..start]);
        match backend {
            Backend::Postgres => {
                let n = match binds.iter().position(|b| *b == ph) {
                    Some(i) => i + 1,
                    None => {
                        binds.push(ph);
                        binds.len()
                    }
                };
                out.push('$');
                out.push_str(&n.to_string());
            }
            Backend::MySql | Backend::Sqlite => {
                binds.push(ph);
                out.push('?');
            }
        }
        last = end;
    }
    out.push_str(&sql[last..]);
    Ok(Compiled { sql: out, binds })
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b'$'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// A byte that can continue an SQL identifier or keyword (PostgreSQL and MySQL
/// allow `$` and any non-ASCII character in identifiers).
fn is_word(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The end of a quoted run that starts after the opening quote at `i`: the index of
/// the closing quote. A doubled quote is an escaped quote; a backslash escapes the
/// next byte where `backslash`.
fn quoted(b: &[u8], mut i: usize, q: u8, backslash: bool) -> Result<usize, String> {
    loop {
        match b.get(i) {
            None => return Err(format!("unterminated {} quote", q as char)),
            Some(&c) if c == q && b.get(i + 1) == Some(&q) => i += 2,
            Some(&c) if c == q => return Ok(i),
            Some(b'\\') if backslash => i += 2,
            Some(_) => i += 1,
        }
    }
}

/// At `i`, a PostgreSQL dollar-quote opening tag (`$$` or `$tag$`): its length.
fn dollar_tag(b: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_word(b[i - 1]) {
        return None; // `a$b$`: part of an identifier
    }
    let mut j = i + 1;
    match b.get(j) {
        Some(b'$') => return Some(2),
        Some(&c) if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {}
        _ => return None, // `$1` is a positional parameter
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    (b.get(j) == Some(&b'$')).then_some(j + 1 - i)
}

/// Whether `before` ends with an expression (a word that is no keyword, a
/// number, `)` or `]`), so that a colon after it separates slice bounds.
fn ends_expression(before: &[u8]) -> bool {
    const KEYWORDS: [&str; 16] = [
        "then", "else", "when", "case", "and", "or", "not", "in", "is", "like", "ilike", "between",
        "select", "array", "any", "all",
    ];
    let end = before
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |p| p + 1);
    let before = &before[..end];
    match before.last() {
        Some(b')' | b']') => true,
        Some(&c) if is_word(c) => {
            let start = before
                .iter()
                .rposition(|&c| !is_word(c))
                .map_or(0, |p| p + 1);
            let word = String::from_utf8_lossy(&before[start..]).to_ascii_lowercase();
            !KEYWORDS.contains(&word.as_str())
        }
        _ => false,
    }
}

/// (start, end, placeholder) for each `:name` outside literals and comments.
fn scan(sql: &str, backend: Backend) -> Result<Vec<(usize, usize, Placeholder)>, String> {
    let (pg, my, lite) = (
        backend == Backend::Postgres,
        backend == Backend::MySql,
        backend == Backend::Sqlite,
    );
    let b = sql.as_bytes();
    let mut out = Vec::new();
    // PostgreSQL: how deep inside `[…]` (array subscripts and slices).
    let mut brackets = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            // PostgreSQL escape strings: E'…' (not the end of a longer word).
            b'E' | b'e' if pg && b.get(i + 1) == Some(&b'\'') && (i == 0 || !is_word(b[i - 1])) => {
                i = quoted(b, i + 2, b'\'', true)? + 1;
            }
            b'\'' => i = quoted(b, i + 1, b'\'', my)? + 1,
            b'"' => i = quoted(b, i + 1, b'"', my)? + 1,
            b'`' if !pg => i = quoted(b, i + 1, b'`', false)? + 1,
            b'[' if lite => match sql[i + 1..].find(']') {
                Some(end) => i += end + 2,
                None => return Err("unterminated [ quote".into()),
            },
            b'$' if pg && dollar_tag(b, i).is_some() => {
                let len = dollar_tag(b, i).unwrap_or(1);
                let tag = &sql[i..i + len];
                match sql[i + len..].find(tag) {
                    Some(end) => i += len + end + len,
                    None => return Err(format!("unterminated {tag} quote")),
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-')
                && (!my
                    || b.get(i + 2)
                        .is_none_or(|c| c.is_ascii_whitespace() || c.is_ascii_control())) =>
            {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'#' if my => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // PostgreSQL nests block comments; the others end at the first `*/`.
                let mut depth = 0usize;
                loop {
                    if i >= b.len() {
                        return Err("unterminated /* comment".into());
                    }
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') && (pg || depth == 0) {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'[' if pg => {
                brackets += 1;
                i += 1;
            }
            b']' if pg => {
                brackets = brackets.saturating_sub(1);
                i += 1;
            }
            b':' if b.get(i + 1) == Some(&b':') => i += 2,
            // A slice bound separator: `arr[lo:hi]`, `arr[f(x):2]`, `m[1:2][a:b]`.
            b':' if brackets > 0 && ends_expression(&b[..i]) => {
                i += 1;
            }
            b':' if b.get(i + 1).is_some_and(|&c| is_ident_start(c)) => {
                let start = i;
                i += 2;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let name = &sql[start + 1..i];
                if b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(|&c| is_ident_start(c)) {
                    let col_start = i + 1;
                    i += 2;
                    while i < b.len() && is_ident(b[i]) {
                        i += 1;
                    }
                    out.push((
                        start,
                        i,
                        Placeholder::Column(name.to_owned(), sql[col_start..i].to_owned()),
                    ));
                } else {
                    out.push((start, i, Placeholder::Param(name.to_owned())));
                }
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Placeholder {
        Placeholder::Param(s.into())
    }

    const ALL: [Backend; 3] = [Backend::MySql, Backend::Postgres, Backend::Sqlite];

    #[test]
    fn names_compile_to_each_backends_placeholders() {
        let sql = "UPDATE a SET b = b - :amount WHERE id = :from AND b >= :amount";
        let my = compile(sql, Backend::MySql).expect("compiles");
        assert_eq!(my.sql, "UPDATE a SET b = b - ? WHERE id = ? AND b >= ?");
        assert_eq!(my.binds, [p("amount"), p("from"), p("amount")]);
        let pg = compile(sql, Backend::Postgres).expect("compiles");
        assert_eq!(pg.sql, "UPDATE a SET b = b - $1 WHERE id = $2 AND b >= $1");
        assert_eq!(pg.binds, [p("amount"), p("from")]);
    }

    #[test]
    fn literals_comments_and_casts_are_not_parameters() {
        let sql =
            "SELECT ':no', \"a:b\", x::text, 'it''s :no' -- :no\n, :yes /* :no */, :s.col, :$now";
        for backend in ALL {
            let names = parse_names(sql, backend).expect("parses");
            assert_eq!(
                names,
                [
                    p("yes"),
                    Placeholder::Column("s".into(), "col".into()),
                    p("$now")
                ],
                "{backend:?}"
            );
            assert!(parse_names("SELECT 'open", backend).is_err());
            assert!(parse_names("SELECT /* open", backend).is_err());
        }
        for backend in [Backend::MySql, Backend::Sqlite] {
            assert_eq!(parse_names("SELECT `c:d`, :a", backend), Ok(vec![p("a")]));
        }
    }

    #[test]
    fn postgres_dollar_quotes_slices_and_standard_strings() {
        let pg = |sql| parse_names(sql, Backend::Postgres);
        assert_eq!(pg("SELECT $$ :no $$, :a"), Ok(vec![p("a")]));
        assert_eq!(pg("SELECT $t$ :no $$ :no $t$, :a, $1"), Ok(vec![p("a")]));
        assert_eq!(pg("SELECT $fn_1$ ':no $fn_1$ || :a"), Ok(vec![p("a")]));
        assert!(pg("SELECT $x$ open").is_err());
        // `$` inside an identifier opens nothing.
        assert_eq!(pg("SELECT a$b$ + :a"), Ok(vec![p("a")]));
        // Slices: a colon right after an expression inside brackets.
        assert_eq!(pg("SELECT arr[lo:hi], arr[1:2], arr[f(x):n]"), Ok(vec![]));
        assert_eq!(
            pg("SELECT m[1:2][a:b] FROM t WHERE x = :x"),
            Ok(vec![p("x")])
        );
        assert_eq!(
            pg("SELECT arr[:lo : :hi], arr[:i]"),
            Ok(vec![p("lo"), p("hi"), p("i")])
        );
        assert_eq!(pg("SELECT arr[lo: :hi]"), Ok(vec![p("hi")]));
        assert_eq!(
            pg("SELECT arr[CASE WHEN :c THEN :a ELSE 1 END]"),
            Ok(vec![p("c"), p("a")])
        );
        // standard_conforming_strings: a backslash is a plain character...
        assert_eq!(pg(r"SELECT 'a\', :a, '\'"), Ok(vec![p("a")]));
        // ...except in E'…' strings.
        assert_eq!(pg(r"SELECT E'it\'s :no', e'\\', :a"), Ok(vec![p("a")]));
        assert_eq!(pg(r"SELECT type'x', :a"), Ok(vec![p("a")]));
        // Block comments nest.
        assert_eq!(pg("SELECT /* a /* :no */ :no */ :a"), Ok(vec![p("a")]));
    }

    #[test]
    fn mysql_backslashes_hashes_and_dashes() {
        let my = |sql| parse_names(sql, Backend::MySql);
        assert_eq!(my(r"SELECT 'it\'s :no', :a"), Ok(vec![p("a")]));
        assert_eq!(my(r#"SELECT "say \":no\"", :a"#), Ok(vec![p("a")]));
        assert_eq!(my("SELECT 1 # :no\n, :a"), Ok(vec![p("a")]));
        assert_eq!(my("SELECT 1 --:a"), Ok(vec![p("a")]));
        assert_eq!(my("SELECT 1 -- :no\n, :a"), Ok(vec![p("a")]));
        // Dollar quotes are PostgreSQL's only.
        assert_eq!(my("SELECT '$$', :a, '$$'"), Ok(vec![p("a")]));
        assert_eq!(my("SELECT arr[lo:hi]"), Ok(vec![p("hi")]));
    }

    #[test]
    fn sqlite_strings_and_bracket_identifiers() {
        let lite = |sql| parse_names(sql, Backend::Sqlite);
        // No backslash escapes in SQLite strings.
        assert_eq!(lite(r"SELECT 'a\', :a"), Ok(vec![p("a")]));
        assert_eq!(lite("SELECT [odd:name], :a"), Ok(vec![p("a")]));
        assert_eq!(lite("SELECT $$ :a $$"), Ok(vec![p("a")]));
    }
}
