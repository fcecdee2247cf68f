//! PostgreSQL values in their binary form: their JSON form, written here type by
//! type (arrays, enums and domains included), and the value itself, bound again
//! with its own type when a later step refers to it (`:step.column`).

use std::fmt::Write as _;

use base64::Engine as _;
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgTypeKind};
use sqlx::types::chrono::{DateTime, NaiveDate};
use sqlx::{Postgres, TypeInfo as _};

/// A column value as PostgreSQL sent it: bound again, it has the column's type and
/// the very same bytes, so nothing is lost or converted on the way.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PgRaw {
    pub(super) ty: PgTypeInfo,
    pub(super) bytes: Option<Vec<u8>>,
}

impl sqlx::Type<Postgres> for PgRaw {
    fn type_info() -> PgTypeInfo {
        // Never used: `produces` names the column's own type.
        PgTypeInfo::with_name("unknown")
    }

    fn compatible(_: &PgTypeInfo) -> bool {
        true
    }
}

impl sqlx::Encode<'_, Postgres> for PgRaw {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        match &self.bytes {
            None => Ok(IsNull::Yes),
            Some(b) => {
                buf.extend_from_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn produces(&self) -> Option<PgTypeInfo> {
        Some(self.ty.clone())
    }
}

/// The JSON text of a value of type `ty` in binary format. `Err` names what cannot
/// be mapped.
pub(super) fn to_json(ty: &PgTypeInfo, bytes: &[u8]) -> Result<String, String> {
    match ty.kind() {
        PgTypeKind::Enum(_) => return text(bytes),
        PgTypeKind::Domain(base) => return to_json(base, bytes),
        PgTypeKind::Array(elem) => return array(elem, bytes),
        PgTypeKind::Range(elem) => return range(elem, bytes),
        _ => {}
    }
    if let Some(oid) = ty.oid() {
        if let Some(json) = scalar(oid.0, bytes)? {
            return Ok(json);
        }
    }
    match ty.name().to_ascii_lowercase().as_str() {
        // Extension types whose binary form is their text.
        "citext" | "ltree" | "lquery" => text(bytes),
        name => Err(format!(
            "PostgreSQL type `{name}` has no JSON form in txq; cast it in the SQL (`::text`)"
        )),
    }
}

fn be<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], String> {
    bytes
        .get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| "truncated binary value".to_owned())
}

fn i16_at(b: &[u8], at: usize) -> Result<i16, String> {
    Ok(i16::from_be_bytes(be(b, at)?))
}

fn i32_at(b: &[u8], at: usize) -> Result<i32, String> {
    Ok(i32::from_be_bytes(be(b, at)?))
}

fn i64_at(b: &[u8], at: usize) -> Result<i64, String> {
    Ok(i64::from_be_bytes(be(b, at)?))
}

pub(super) fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn text(bytes: &[u8]) -> Result<String, String> {
    std::str::from_utf8(bytes)
        .map(quote)
        .map_err(|_| "text that is not UTF-8".to_owned())
}

/// A float as JSON: a number, or `"NaN"`, `"Infinity"`, `"-Infinity"` as the
/// databases write them.
pub(super) fn float(f: f64) -> String {
    if f.is_nan() {
        quote("NaN")
    } else if f.is_infinite() {
        quote(if f > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        serde_json::Number::from_f64(f).map_or_else(String::new, |n| n.to_string())
    }
}

/// A float4 as JSON: its shortest decimal form (`1.1`, not `1.100000023841858`).
pub(super) fn float4(f: f32) -> String {
    if f.is_finite() {
        // The shortest text that reads back as the same f32, as a JSON number.
        let shortest = format!("{f:?}");
        shortest
            .parse::<f64>()
            .map_or_else(|_| float(f64::from(f)), float)
    } else {
        float(f64::from(f))
    }
}

const PG_EPOCH_DAYS: i64 = 730_120; // 2000-01-01 in days from 0001-01-01 (CE day 1)

/// `HH:MM:SS` and as many decimals as the microseconds need (none, 3 or 6).
fn clock(us: i64) -> String {
    let (h, rest) = (us / 3_600_000_000, us % 3_600_000_000);
    let (m, rest) = (rest / 60_000_000, rest % 60_000_000);
    let (s, frac) = (rest / 1_000_000, rest % 1_000_000);
    let mut out = format!("{h:02}:{m:02}:{s:02}");
    if frac % 1000 != 0 {
        let _ = write!(out, ".{frac:06}");
    } else if frac != 0 {
        let _ = write!(out, ".{:03}", frac / 1000);
    }
    out
}

/// A timestamp as RFC 3339 in UTC (`…Z`), or `"infinity"` / `"-infinity"`.
fn timestamp(us: i64) -> Result<String, String> {
    match us {
        i64::MAX => return Ok(quote("infinity")),
        i64::MIN => return Ok(quote("-infinity")),
        _ => {}
    }
    // PostgreSQL counts from 2000-01-01, Unix from 1970-01-01.
    let t = us
        .checked_add(946_684_800_000_000)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or("timestamp out of range")?;
    Ok(quote(&super::params::rfc3339(t)))
}

fn numeric(b: &[u8]) -> Result<String, String> {
    let ndigits = usize::try_from(i16_at(b, 0)?).map_err(|_| "bad numeric")?;
    let weight = i64::from(i16_at(b, 2)?);
    let sign = u16::from_be_bytes(be(b, 4)?);
    let dscale = usize::from(u16::from_be_bytes(be(b, 6)?));
    match sign {
        0xC000 => return Ok(quote("NaN")),
        0xD000 => return Ok(quote("Infinity")),
        0xF000 => return Ok(quote("-Infinity")),
        _ => {}
    }
    let digits: Vec<i64> = (0..ndigits)
        .map(|i| i16_at(b, 8 + 2 * i).map(i64::from))
        .collect::<Result<_, _>>()?;
    let digit = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for i in 0..=weight {
            if i == 0 {
                let _ = write!(out, "{}", digit(0));
            } else {
                let _ = write!(out, "{:04}", digit(i));
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut frac = String::new();
        let mut g = 1;
        while frac.len() < dscale {
            let _ = write!(frac, "{:04}", digit(weight + g));
            g += 1;
        }
        out.push_str(&frac[..dscale]);
    }
    Ok(quote(&out))
}

/// An interval in ISO 8601, as PostgreSQL writes it with `intervalstyle =
/// iso_8601`: `P1Y2M3DT4H5M6.5S`, `PT0S`.
fn interval(b: &[u8]) -> Result<String, String> {
    let us = i64_at(b, 0)?;
    let days = i32_at(b, 8)?;
    let months = i32_at(b, 12)?;
    if us == 0 && days == 0 && months == 0 {
        return Ok(quote("PT0S"));
    }
    let mut out = String::from("P");
    let part = |out: &mut String, v: i64, unit: char| {
        if v != 0 {
            let _ = write!(out, "{v}{unit}");
        }
    };
    part(&mut out, i64::from(months / 12), 'Y');
    part(&mut out, i64::from(months % 12), 'M');
    part(&mut out, i64::from(days), 'D');
    if us != 0 {
        out.push('T');
        let (h, rest) = (us / 3_600_000_000, us % 3_600_000_000);
        let (m, rest) = (rest / 60_000_000, rest % 60_000_000);
        part(&mut out, h, 'H');
        part(&mut out, m, 'M');
        if rest != 0 {
            if rest < 0 {
                out.push('-');
            }
            let rest = rest.unsigned_abs();
            let (s, frac) = (rest / 1_000_000, rest % 1_000_000);
            let _ = write!(out, "{s}");
            if frac != 0 {
                let f = format!("{frac:06}");
                let _ = write!(out, ".{}", f.trim_end_matches('0'));
            }
            out.push('S');
        }
    }
    Ok(quote(&out))
}

/// `inet` / `cidr` as PostgreSQL writes them: `10.0.0.1`, `10.0.0.0/8`, `::1/128`.
fn inet(b: &[u8], cidr: bool) -> Result<String, String> {
    let family = *b.first().ok_or("truncated inet")?;
    let bits = *b.get(1).ok_or("truncated inet")?;
    let addr = b.get(4..).ok_or("truncated inet")?;
    let (text, max) = match family {
        2 => {
            let a: [u8; 4] = addr.try_into().map_err(|_| "bad inet")?;
            (std::net::Ipv4Addr::from(a).to_string(), 32)
        }
        3 => {
            let a: [u8; 16] = addr.try_into().map_err(|_| "bad inet")?;
            (std::net::Ipv6Addr::from(a).to_string(), 128)
        }
        _ => return Err("unknown inet family".into()),
    };
    Ok(quote(&if cidr || bits != max {
        format!("{text}/{bits}")
    } else {
        text
    }))
}

fn hex_pairs(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Built-in scalar types by OID; `None` for a type not known here.
fn scalar(oid: u32, b: &[u8]) -> Result<Option<String>, String> {
    Ok(Some(match oid {
        16 => (b.first() == Some(&1)).to_string(),
        2278 => "null".to_owned(), // void
        17 => quote(&base64::engine::general_purpose::STANDARD.encode(b)),
        18 => quote(&b.iter().map(|&c| char::from(c)).collect::<String>()),
        // name, text, xml, bpchar, varchar, unknown
        19 | 25 | 142 | 705 | 1042 | 1043 => text(b)?,
        20 => i64_at(b, 0)?.to_string(),
        21 => i16_at(b, 0)?.to_string(),
        23 => i32_at(b, 0)?.to_string(),
        // oid, regproc, xid, cid, regclass, regtype and their kin: unsigned 32 bits
        24 | 26 | 28 | 29 | 2202..=2206 | 3734 | 3769 | 4089 | 4096 => {
            u32::from_be_bytes(be(b, 0)?).to_string()
        }
        5069 => u64::from_be_bytes(be(b, 0)?).to_string(),
        114 => json(b)?,
        3802 => json(b.get(1..).ok_or("truncated jsonb")?)?,
        4072 => text(b.get(1..).ok_or("truncated jsonpath")?)?,
        700 => float4(f32::from_be_bytes(be(b, 0)?)),
        701 => float(f64::from_be_bytes(be(b, 0)?)),
        790 => {
            // money: an integer of cents (lc_monetary with two decimals, as C and
            // en_US have).
            let cents = i128::from(i64_at(b, 0)?);
            let sign = if cents < 0 { "-" } else { "" };
            let cents = cents.unsigned_abs();
            quote(&format!("{sign}{}.{:02}", cents / 100, cents % 100))
        }
        1700 => numeric(b)?,
        1082 => match i32_at(b, 0)? {
            i32::MAX => quote("infinity"),
            i32::MIN => quote("-infinity"),
            days => {
                let d = i32::try_from(PG_EPOCH_DAYS + i64::from(days))
                    .ok()
                    .and_then(NaiveDate::from_num_days_from_ce_opt)
                    .ok_or("date out of range")?;
                quote(&d.format("%Y-%m-%d").to_string())
            }
        },
        1083 => quote(&clock(i64_at(b, 0)?)),
        1266 => {
            let (us, west) = (i64_at(b, 0)?, i32_at(b, 8)?);
            let east = -west;
            let sign = if east < 0 { '-' } else { '+' };
            let east = east.unsigned_abs();
            let mut zone = format!("{sign}{:02}:{:02}", east / 3600, east / 60 % 60);
            if east % 60 != 0 {
                let _ = write!(zone, ":{:02}", east % 60);
            }
            quote(&format!("{}{zone}", clock(us)))
        }
        1114 | 1184 => timestamp(i64_at(b, 0)?)?,
        1186 => interval(b)?,
        869 => inet(b, false)?,
        650 => inet(b, true)?,
        829 | 774 => quote(&hex_pairs(b)),
        2950 => {
            let u: [u8; 16] = b.try_into().map_err(|_| "bad uuid")?;
            quote(&uuid::Uuid::from_bytes(u).hyphenated().to_string())
        }
        1560 | 1562 => {
            let n = usize::try_from(i32_at(b, 0)?).map_err(|_| "bad bit string")?;
            let bits: String = (0..n)
                .map(|i| {
                    let byte = b.get(4 + i / 8).copied().unwrap_or(0);
                    if byte & (0x80 >> (i % 8)) != 0 {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect();
            quote(&bits)
        }
        _ => return Ok(None),
    }))
}

/// JSON text as stored: kept as written, so its numbers keep every digit.
fn json(b: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(b).map_err(|_| "JSON that is not UTF-8")?;
    serde_json::from_str::<&serde_json::value::RawValue>(s)
        .map(|r| r.get().to_owned())
        .map_err(|e| format!("invalid JSON: {e}"))
}

/// An array (of any dimension) as nested JSON arrays; lower bounds are dropped.
fn array(elem: &PgTypeInfo, b: &[u8]) -> Result<String, String> {
    let ndim = usize::try_from(i32_at(b, 0)?).map_err(|_| "bad array")?;
    if ndim == 0 {
        return Ok("[]".into());
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            i32_at(b, 12 + 8 * d).and_then(|n| usize::try_from(n).map_err(|_| "bad array".into()))
        })
        .collect::<Result<_, _>>()?;
    let mut at = 12 + 8 * ndim;
    let mut elems = Vec::new();
    for _ in 0..dims.iter().product::<usize>() {
        let len = i32_at(b, at)?;
        at += 4;
        if len < 0 {
            elems.push("null".to_owned());
        } else {
            let len = usize::try_from(len).map_err(|_| "bad array")?;
            let v = b.get(at..at + len).ok_or("truncated array")?;
            elems.push(to_json(elem, v)?);
            at += len;
        }
    }
    fn nest(dims: &[usize], elems: &mut std::vec::IntoIter<String>) -> String {
        let parts: Vec<String> = (0..dims[0])
            .map(|_| {
                if dims.len() == 1 {
                    elems.next().unwrap_or_default()
                } else {
                    nest(&dims[1..], elems)
                }
            })
            .collect();
        format!("[{}]", parts.join(","))
    }
    Ok(nest(&dims, &mut elems.into_iter()))
}

/// A range as an object: `{"lower": …, "upper": …, "bounds": "[)"}` (an absent
/// bound is null, unbounded), or `{"empty": true}`.
fn range(elem: &PgTypeInfo, b: &[u8]) -> Result<String, String> {
    let flags = *b.first().ok_or("truncated range")?;
    if flags & 0x01 != 0 {
        return Ok(r#"{"empty":true}"#.into());
    }
    let mut at = 1;
    let mut bound = |infinite: bool| -> Result<String, String> {
        if infinite {
            return Ok("null".into());
        }
        let len = usize::try_from(i32_at(b, at)?).map_err(|_| "bad range")?;
        let v = b.get(at + 4..at + 4 + len).ok_or("truncated range")?;
        at += 4 + len;
        to_json(elem, v)
    };
    let lower = bound(flags & 0x08 != 0)?;
    let upper = bound(flags & 0x10 != 0)?;
    let bounds = format!(
        "{}{}",
        if flags & 0x02 != 0 { '[' } else { '(' },
        if flags & 0x04 != 0 { ']' } else { ')' }
    );
    Ok(format!(
        r#"{{"lower":{lower},"upper":{upper},"bounds":{}}}"#,
        quote(&bounds)
    ))
}
