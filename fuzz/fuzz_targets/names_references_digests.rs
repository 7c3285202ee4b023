//! Repository names, tags, references and digests: never a panic, and whatever parses
//! prints back to the same text and parses again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = oci::RepositoryName::parse(s) {
        assert_eq!(n.to_string(), s);
        assert!(s.len() <= 255 && !s.contains("..") && !s.contains("//"));
    }
    if let Ok(r) = oci::Reference::parse(s) {
        assert_eq!(oci::Reference::parse(&r.to_string()).ok(), Some(r));
    }
    if let Ok(d) = oci::Digest::parse(s) {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.hex().len(), d.algorithm().hex_len());
    }
});
