//! What the gateway's own endpoints (and the console) read of a request. A leaf: the proxy
//! fills it, `endpoints` and `console` read it.

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
