//! `/v2/` routes as the gateway and the storage service see them: a method byte and a path.
//! Never a panic; a route that names a repository names a valid one.
#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 7] = ["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(path) = std::str::from_utf8(rest) else {
        return;
    };
    let method = METHODS[m as usize % METHODS.len()];
    if let Ok(ep) = oci::parse_route(method, path) {
        if let Some(name) = ep.repository() {
            assert!(oci::RepositoryName::parse(&name.to_string()).is_ok());
        }
        let _ = ep.label();
        let _ = ep.action();
    }
});
