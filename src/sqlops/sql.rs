//! Named parameters in SQL text: found while skipping string literals, quoted
//! identifiers, comments and PostgreSQL `::` casts, and compiled to the backend's
//! placeholders. Values are always bound, never written into the SQL.

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

/// The named parameters of `sql`, in order of appearance.
pub fn parse_names(sql: &str) -> Result<Vec<Placeholder>, String> {
    Ok(scan(sql)?.into_iter().map(|(_, _, p)| p).collect())
}

/// Compiles `sql` for `backend`.
pub fn compile(sql: &str, backend: Backend) -> Result<Compiled, String> {
    let found = scan(sql)?;
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

/// (start, end, placeholder) for each `:name` outside literals and comments.
fn scan(sql: &str) -> Result<Vec<(usize, usize, Placeholder)>, String> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                // A quoted run; a doubled quote is an escaped quote.
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(format!("unterminated {} quote", q as char)),
                        Some(&c) if c == q && b.get(i + 1) == Some(&q) => i += 2,
                        Some(&c) if c == q => break,
                        Some(b'\\') if q == b'\'' => i += 2,
                        Some(_) => i += 1,
                    }
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => match sql[i + 2..].find("*/") {
                Some(end) => i += end + 4,
                None => return Err("unterminated /* comment".into()),
            },
            b':' if b.get(i + 1) == Some(&b':') => i += 2,
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
        let sql = "SELECT ':no', \"a:b\", `c:d`, x::text, 'it''s :no' -- :no\n, :yes /* :no */, :s.col, :$now";
        let names = parse_names(sql).expect("parses");
        assert_eq!(
            names,
            [
                p("yes"),
                Placeholder::Column("s".into(), "col".into()),
                p("$now")
            ]
        );
        assert!(parse_names("SELECT 'open").is_err());
        assert!(parse_names("SELECT /* open").is_err());
    }
}
