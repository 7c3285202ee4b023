//! What the gateway's own endpoints (and the console) read of a request. A leaf: the proxy
//! fills it, `endpoints` and `console` read it.

/// The value of the cookie `name` in a `Cookie` header; none when there is none or more than
/// one (a planted second one, e.g. on a more specific path or by a sibling subdomain, is not
/// picked over ours: it fails the check instead).
pub fn cookie<'a>(cookies: Option<&'a str>, name: &str) -> Option<&'a str> {
    let mut found = cookies?.split(';').filter_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// What an endpoint reads of a request. No `Debug`: it holds credentials, cookies and forms
/// with passwords and tokens, which must never reach a log.
#[derive(Default)]
pub struct Incoming {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub cookies: Option<String>,
    /// The `Host` the client used (for URLs shown back to it).
    pub host: String,
    /// The client's address (lockouts, rate limits).
    pub source: Option<String>,
    /// The body, when the route reads one ([`crate::route::Route::reads_body`]).
    pub body: Vec<u8>,
}
