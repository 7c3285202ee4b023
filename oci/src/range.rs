//! `Range` (blob GET) and `Content-Range` (chunked upload PATCH) headers.

/// What a `Range` request header asks of a resource of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No range, or one we ignore (malformed or multi-range, RFC 9110 §14.2): send it all.
    Full,
    /// Send bytes `start..=end` (already clamped to the size).
    Partial { start: u64, end: u64 },
    /// Nothing of the resource is in the range: answer 416 with `bytes */<size>`.
    Unsatisfiable,
}

/// Resolves a `Range` header against a resource of `size` bytes.
pub fn resolve_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(n) = parse_u64(last) else {
            return RangeRequest::Full;
        };
        if n == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Partial {
            start: size - n.min(size),
            end: size - 1,
        };
    }
    let Some(start) = parse_u64(first) else {
        return RangeRequest::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match parse_u64(last) {
            Some(e) if e >= start => Some(e),
            _ => return RangeRequest::Full,
        }
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Partial {
        start,
        end: end.map_or(size - 1, |e| e.min(size - 1)),
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses the `Content-Range` of an upload chunk: `<start>-<end>` (inclusive) as the
/// distribution spec writes it, also accepting the RFC form `bytes <start>-<end>/<total|*>`.
/// Returns `(start, end)`; `None` when malformed or `end < start`.
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let h = header.trim();
    let h = h
        .strip_prefix("bytes ")
        .or_else(|| h.strip_prefix("bytes="))
        .unwrap_or(h);
    let h = h.split_once('/').map_or(h, |(r, _)| r);
    let (a, b) = h.split_once('-')?;
    let (a, b) = (parse_u64(a.trim())?, parse_u64(b.trim())?);
    (b >= a).then_some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeRequest::*;

    #[test]
    fn range_table() {
        let cases: &[(Option<&str>, u64, RangeRequest)] = &[
            (None, 10, Full),
            (Some("bytes=0-4"), 10, Partial { start: 0, end: 4 }),
            (Some("bytes=5-"), 10, Partial { start: 5, end: 9 }),
            (Some("bytes=-3"), 10, Partial { start: 7, end: 9 }),
            (Some("bytes=-30"), 10, Partial { start: 0, end: 9 }),
            (Some("bytes=8-100"), 10, Partial { start: 8, end: 9 }),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=10-20"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=5-3"), 10, Full),
            (Some("bytes=0-1,4-5"), 10, Full),
            (Some("items=0-1"), 10, Full),
            (Some("bytes=a-b"), 10, Full),
            (Some("bytes=-"), 10, Full),
            (Some("bytes=99999999999999999999999-"), 10, Full),
        ];
        for (h, size, want) in cases {
            assert_eq!(resolve_range(*h, *size), *want, "{h:?} of {size}");
        }
    }

    #[test]
    fn content_range_table() {
        let cases: &[(&str, Option<(u64, u64)>)] = &[
            ("0-99", Some((0, 99))),
            ("100-100", Some((100, 100))),
            ("bytes 0-9/10", Some((0, 9))),
            ("bytes 0-9/*", Some((0, 9))),
            ("9-0", None),
            ("-5", None),
            ("5-", None),
            ("a-b", None),
            ("", None),
            ("+1-2", None),
        ];
        for (h, want) in cases {
            assert_eq!(parse_content_range(h), *want, "{h:?}");
        }
    }
}
