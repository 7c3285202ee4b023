//! `Range` (blob GETs) and `Content-Range` (upload PATCHes): never a panic, and a partial
//! range always lies inside the resource.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oci::range::{RangeRequest, parse_content_range, resolve_range};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u64::from_le_bytes(data[..8].try_into().expect("8 bytes")) % (1 << 50);
    let Ok(header) = std::str::from_utf8(&data[8..]) else {
        return;
    };
    if let RangeRequest::Partial { start, end } = resolve_range(Some(header), size) {
        assert!(start <= end && end < size, "{header:?} on {size}: {start}-{end}");
    }
    if let Some((start, end)) = parse_content_range(header) {
        assert!(start <= end, "{header:?}: {start}-{end}");
    }
});
