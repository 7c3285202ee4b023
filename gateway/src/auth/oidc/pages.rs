//! The HTML pages of the sign-in flows: everything shown is escaped (`esc`). (None is cached:
//! `proxy::send` says `no-store` on every answer of the gateway's own.)

use crate::auth::Identity;
use crate::reply::Reply;

/// An HTML page for the browser.
pub(super) fn page(status: u16, title: &str, body: &str) -> Reply {
    Reply::html(
        status,
        format!(
            "<!doctype html><meta charset=\"utf-8\"><title>Portcullis: {}</title>\n{body}\n",
            esc(title)
        ),
    )
}

/// The browser sent to the identity provider's sign-in (`location`), holding the cookie that
/// binds the flow to it.
pub fn login_redirect(location: String, cookie: String) -> Reply {
    Reply::html(302, String::new())
        .with_header("location", location)
        .with_header("set-cookie", cookie)
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub(super) fn unavailable(e: &anyhow::Error) -> Reply {
    tracing::warn!(error = %format!("{e:#}"), "device sign-in: the identity provider or the state store is unavailable");
    page(
        503,
        "unavailable",
        "<p>The identity provider is unavailable, try again later.</p>",
    )
}

/// The page shown when a login approved a device flow.
pub fn device_approved_page(device: &str) -> String {
    format!(
        "<!doctype html><meta charset=\"utf-8\"><title>Portcullis: device signed in</title>\n\
         <h1 id=\"device-approved\">{} is signed in</h1><p>You can close this page and return to it.</p>\n",
        esc(if device.is_empty() {
            "The device"
        } else {
            device
        })
    )
}

/// The page shown after a login: how to use the refresh token from the CLI.
pub fn success_page(host: &str, id: &Identity, device: &str, refresh: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>Portcullis: signed in</title>
<h1>Signed in as {user}</h1>
<p>Groups: {groups}</p>
<p>A registry token for <b>{device}</b> (shown once; revoke it at <code>/auth/revoke</code>):</p>
<pre id="refresh-token">{refresh}</pre>
<p>Log in from the command line with it:</p>
<pre>docker login {host} -u '&lt;token&gt;' -p {refresh}
podman login {host} -u '&lt;token&gt;' -p {refresh}</pre>
"#,
        user = esc(&id.subject),
        groups = esc(&id.groups.join(", ")),
        device = esc(if device.is_empty() {
            "this device"
        } else {
            device
        }),
        host = esc(host),
        refresh = esc(refresh),
    )
}
