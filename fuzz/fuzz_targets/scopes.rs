//! The `scope` parameter of token requests (space-separated `type:name:actions`): never a
//! panic; a parsed scope prints back to one that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(list) = oci::scope::Scope::parse_list(s) {
        for scope in list {
            let again = oci::scope::Scope::parse(&scope.to_string());
            if !scope.actions.is_empty() {
                assert_eq!(again.ok(), Some(scope));
            }
        }
    }
});
