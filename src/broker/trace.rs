//! W3C Trace Context: a job continues its request's trace, and what it publishes
//! (reply, retry and dead-letter copies) carries the job as the parent.

/// The job's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    /// 32 lowercase hex digits, shared by the whole trace.
    pub trace_id: String,
    /// The request's span (16 hex digits), when it came with a valid `traceparent`.
    pub parent_id: Option<String>,
    /// This job's span, 16 hex digits.
    pub span_id: String,
    /// Trace flags (2 hex digits; `01` = sampled).
    pub flags: String,
}

impl Trace {
    /// Continues `traceparent` when it is valid; otherwise starts a new trace, as
    /// the W3C spec asks of a receiver that cannot parse the header.
    pub fn continue_from(traceparent: Option<&str>) -> Self {
        match traceparent.and_then(parse) {
            Some((trace_id, parent_id, flags)) => Self {
                trace_id: trace_id.to_owned(),
                parent_id: Some(parent_id.to_owned()),
                span_id: random_hex(8),
                flags: flags.to_owned(),
            },
            None => Self {
                trace_id: random_hex(16),
                parent_id: None,
                span_id: random_hex(8),
                flags: "01".to_owned(),
            },
        }
    }

    /// The `traceparent` of a message this job publishes: same trace, the job as
    /// parent.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// `(trace_id, parent_id, flags)` of a valid header. Versions above 00 are read
/// by their first four fields, as the spec says; `ff` is invalid.
fn parse(header: &str) -> Option<(&str, &str, &str)> {
    let header = header.trim();
    let mut parts = header.split('-');
    let (version, trace_id, parent_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let valid = hex(version, 2)
        && version != "ff"
        && (version != "00" || parts.next().is_none())
        && hex(trace_id, 32)
        && !zero(trace_id)
        && hex(parent_id, 16)
        && !zero(parent_id)
        && hex(flags, 2);
    valid.then_some((trace_id, parent_id, flags))
}

fn random_hex(bytes: usize) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    loop {
        let out: String = (0..bytes)
            .flat_map(|_| {
                let b = rand::random::<u8>();
                [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]].map(char::from)
            })
            .collect();
        // All zeros is invalid in both fields.
        if out.bytes().any(|b| b != b'0') {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_header_is_continued_with_the_job_as_parent() {
        let t = Trace::continue_from(Some(TP));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        let out = t.traceparent();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(out.ends_with("-01"));
        assert_eq!(parse(&out).map(|p| p.1), Some(t.span_id.as_str()));
    }

    #[test]
    fn invalid_headers_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = Trace::continue_from(Some(bad));
            assert_eq!(t.parent_id, None, "{bad}");
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
            assert!(parse(&t.traceparent()).is_some(), "{bad}");
        }
        // A later version may carry more fields.
        assert!(
            Trace::continue_from(Some(
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
            ))
            .parent_id
            .is_some()
        );
    }
}
