//! Events of registry operations, and the request fields every event carries.
//!
//! The proxy fills an [`Operation`] as a `/v2/` request goes through (the endpoint, who
//! asked, why it was refused, what storage answered, bytes) and calls [`Operation::finish`]
//! once the response is written. Which requests make an event:
//!
//! - reads of content (`manifest-pull`, `blob-pull`, `tags-list`, `catalog`,
//!   `referrers-list`) and every write (`manifest-push`, `tag-create`, `tag-overwrite`,
//!   `blob-push`, `blob-mount`, `manifest-delete`, `tag-delete`, `blob-delete`), whatever
//!   their outcome;
//! - `HEAD` requests and the intermediate steps of an upload (start, `PATCH`, status,
//!   cancel) only when they fail: they are how clients probe, and a push is audited once,
//!   at the request that makes the blob exist;
//! - a request without credentials answered with the 401 challenge is not audited (every
//!   client starts with one); a request with a bad or insufficient token is.
//!
//! A break-glass use of `override-immutable` that succeeds makes a second event,
//! `break-glass`, with the same fields.

use oci::{Endpoint, Reference};
use serde_json::{Map, Value};
use std::time::Duration;

/// The request an event belongs to.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    pub request_id: String,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub method: String,
    pub path: String,
}

impl RequestInfo {
    /// Adds the request's fields to an event (those it does not have yet).
    pub fn add_to(&self, event: &mut Map<String, Value>) {
        let mut put = |k: &str, v: &str| {
            if !event.contains_key(k) {
                event.insert(k.into(), v.into());
            }
        };
        put("http.request.id", &self.request_id);
        put("http.request.method", &self.method);
        put("url.path", &self.path);
        if let Some(ip) = &self.source_ip {
            put("source.ip", ip);
        }
        if let Some(ua) = &self.user_agent {
            put("user_agent.original", ua);
        }
    }
}

/// Who made a registry request, from its verified token.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// `user`, `robot`, `ci` or `anonymous`.
    pub kind: String,
    pub groups: Vec<String>,
}

/// What the proxy learns about a `/v2/` request.
#[derive(Debug, Default)]
pub struct Operation {
    pub endpoint: Option<Endpoint>,
    /// The request's query (mount and monolithic pushes are told by it).
    pub query: Option<String>,
    pub user: Option<User>,
    /// Why the gateway refused it.
    pub reason: Option<String>,
    /// A manifest PUT or DELETE refused because a tag is immutable.
    pub immutable_denied: bool,
    /// `override-immutable` was used.
    pub break_glass: bool,
    /// What the tag pointed to before a manifest PUT moved it (storage says).
    pub previous_digest: Option<String>,
    /// `Docker-Content-Digest` of the response.
    pub digest: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Under a pull-through cache prefix: how it was answered (`hit`, `miss`, `shared`,
    /// `stale`, `error`).
    pub cache: Option<&'static str>,
    /// The answer's head went out but its body was cut short (a failed upstream fetch): a
    /// failure whatever the status says.
    pub aborted: bool,
}

fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

impl Operation {
    /// The event's action, or `None` when this request is not audited.
    fn action(&self, status: u16) -> Option<&'static str> {
        let failed = status >= 400;
        let ep = self.endpoint.as_ref()?;
        let has = |k: &str| query_value(self.query.as_deref(), k).is_some();
        Some(match ep {
            Endpoint::Base => return failed.then_some("login-check"),
            Endpoint::Catalog => "catalog",
            Endpoint::ListTags { .. } => "tags-list",
            Endpoint::Referrers { .. } => "referrers-list",
            Endpoint::GetManifest { head: true, .. } if !failed => return None,
            Endpoint::GetManifest { .. } => "manifest-pull",
            Endpoint::GetBlob { head: true, .. } if !failed => return None,
            Endpoint::GetBlob { .. } => "blob-pull",
            Endpoint::PutManifest {
                reference: Reference::Tag(_),
                ..
            } => match &self.previous_digest {
                _ if self.immutable_denied => "tag-overwrite",
                None => "tag-create",
                // The same manifest pushed again: the tag did not move.
                Some(p) if Some(p) == self.digest.as_ref() => "manifest-push",
                Some(_) => "tag-overwrite",
            },
            Endpoint::PutManifest { .. } => "manifest-push",
            Endpoint::DeleteManifest {
                reference: Reference::Tag(_),
                ..
            } => "tag-delete",
            Endpoint::DeleteManifest { .. } => "manifest-delete",
            Endpoint::DeleteBlob { .. } => "blob-delete",
            Endpoint::StartUpload { .. } if has("mount") && (failed || status == 201) => {
                "blob-mount"
            }
            Endpoint::StartUpload { .. } if has("digest") || failed => "blob-push",
            Endpoint::FinishUpload { .. } => "blob-push",
            Endpoint::StartUpload { .. } => return None,
            Endpoint::UploadStatus { .. }
            | Endpoint::PatchUpload { .. }
            | Endpoint::CancelUpload { .. } => return failed.then_some("blob-push"),
        })
    }

    /// Records the request's event(s), if it is audited: `status` is what the client got.
    pub fn finish(&self, info: &RequestInfo, status: u16, duration: Duration) {
        let Some((action, outcome, fields)) = self.event(info, status, duration) else {
            return;
        };
        if self.break_glass && outcome == "success" {
            super::record("break-glass", "success", fields.clone());
        }
        super::record(action, outcome, fields);
    }

    /// The event of [`finish`](Self::finish), built without recording it.
    pub fn event(
        &self,
        info: &RequestInfo,
        status: u16,
        duration: Duration,
    ) -> Option<(&'static str, &'static str, Value)> {
        let action = self.action(status)?;
        let outcome = if status < 400 && !self.aborted {
            "success"
        } else {
            "failure"
        };
        let mut e = Map::new();
        info.add_to(&mut e);
        e.insert("event.category".into(), "registry".into());
        e.insert("http.response.status_code".into(), status.into());
        e.insert(
            "event.duration".into(),
            (duration.as_nanos().min(u64::MAX as u128) as u64).into(),
        );
        match &self.user {
            Some(u) => {
                e.insert("user.name".into(), u.name.clone().into());
                e.insert("user.roles".into(), u.groups.clone().into());
                e.insert("identity.kind".into(), u.kind.clone().into());
            }
            None => {
                e.insert("identity.kind".into(), "none".into());
            }
        }
        if status >= 400 || self.aborted {
            let reason = self.reason.clone().unwrap_or_else(|| {
                http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|s| s.canonical_reason())
                    .unwrap_or("error")
                    .to_lowercase()
            });
            e.insert("event.reason".into(), reason.into());
        }
        if let Some(c) = self.cache {
            e.insert("cache.result".into(), c.into());
        }
        if let Some(ep) = &self.endpoint {
            if let Some(name) = ep.repository() {
                e.insert("repository".into(), name.to_string().into());
            }
            let (tag, digest) = match ep {
                Endpoint::GetManifest { reference, .. }
                | Endpoint::PutManifest { reference, .. }
                | Endpoint::DeleteManifest { reference, .. } => match reference {
                    Reference::Tag(t) => (Some(t.to_string()), None),
                    Reference::Digest(d) => (None, Some(d.to_string())),
                },
                Endpoint::GetBlob { digest, .. }
                | Endpoint::DeleteBlob { digest, .. }
                | Endpoint::Referrers { digest, .. } => (None, Some(digest.to_string())),
                Endpoint::StartUpload { .. } | Endpoint::FinishUpload { .. } => (
                    None,
                    query_value(self.query.as_deref(), "mount")
                        .or_else(|| query_value(self.query.as_deref(), "digest")),
                ),
                _ => (None, None),
            };
            if let Some(t) = tag {
                e.insert("tag".into(), t.into());
            }
            if let Some(d) = digest.or_else(|| self.digest.clone()) {
                e.insert("digest".into(), d.into());
            }
            if let Some(from) = query_value(self.query.as_deref(), "from")
                .filter(|_| matches!(ep, Endpoint::StartUpload { .. }))
            {
                e.insert("mount_from".into(), from.into());
            }
        }
        if let Some(p) = &self.previous_digest {
            e.insert("previous_digest".into(), p.clone().into());
        }
        if self.break_glass {
            e.insert("break_glass".into(), true.into());
        }
        e.insert("http.request.body.bytes".into(), self.bytes_in.into());
        e.insert("http.response.body.bytes".into(), self.bytes_out.into());
        Some((action, outcome, Value::Object(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(method: &str, path: &str, query: Option<&str>) -> Operation {
        Operation {
            endpoint: oci::parse_route(method, path).ok(),
            query: query.map(str::to_owned),
            user: Some(User {
                name: "alice".into(),
                kind: "user".into(),
                groups: vec!["dev".into()],
            }),
            ..Operation::default()
        }
    }

    fn action(o: &Operation, status: u16) -> Option<&'static str> {
        o.action(status)
    }

    #[test]
    fn which_requests_are_audited_and_as_what() {
        let m = "/v2/a/b/manifests/latest";
        assert_eq!(action(&op("GET", m, None), 200), Some("manifest-pull"));
        assert_eq!(action(&op("HEAD", m, None), 200), None);
        assert_eq!(action(&op("HEAD", m, None), 401), Some("manifest-pull"));
        assert_eq!(action(&op("PUT", m, None), 201), Some("tag-create"));
        let mut moved = op("PUT", m, None);
        moved.previous_digest = Some("sha256:x".into());
        moved.digest = Some("sha256:y".into());
        assert_eq!(action(&moved, 201), Some("tag-overwrite"));
        moved.digest = Some("sha256:x".into());
        assert_eq!(action(&moved, 201), Some("manifest-push"));
        let mut denied = op("PUT", m, None);
        denied.immutable_denied = true;
        assert_eq!(action(&denied, 403), Some("tag-overwrite"));
        assert_eq!(action(&op("DELETE", m, None), 202), Some("tag-delete"));
        let up = "/v2/a/b/blobs/uploads/";
        assert_eq!(action(&op("POST", up, None), 202), None);
        assert_eq!(action(&op("POST", up, None), 403), Some("blob-push"));
        let mount = Some("mount=sha256:aa&from=c/d");
        assert_eq!(action(&op("POST", up, mount), 201), Some("blob-mount"));
        assert_eq!(action(&op("POST", up, mount), 202), None);
        let mono = Some("digest=sha256:aa");
        assert_eq!(action(&op("POST", up, mono), 201), Some("blob-push"));
        let session = "/v2/a/b/blobs/uploads/abc";
        assert_eq!(action(&op("PATCH", session, None), 202), None);
        assert_eq!(action(&op("PATCH", session, None), 416), Some("blob-push"));
        assert_eq!(action(&op("PUT", session, mono), 201), Some("blob-push"));
        assert_eq!(action(&op("GET", "/v2/", None), 200), None);
    }

    #[test]
    fn event_fields() {
        let info = RequestInfo {
            request_id: "r1".into(),
            source_ip: Some("127.0.0.1".into()),
            user_agent: Some("skopeo".into()),
            method: "POST".into(),
            path: "/v2/a/b/blobs/uploads/".into(),
        };
        let mut o = op(
            "POST",
            "/v2/a/b/blobs/uploads/",
            Some("mount=sha256:aa&from=c/d"),
        );
        o.reason = Some("insufficient_scope".into());
        let (action, outcome, e) = o.event(&info, 403, Duration::from_millis(2)).unwrap();
        assert_eq!((action, outcome), ("blob-mount", "failure"));
        assert_eq!(e["repository"], "a/b");
        assert_eq!(e["digest"], "sha256:aa");
        assert_eq!(e["mount_from"], "c/d");
        assert_eq!(e["event.reason"], "insufficient_scope");
        assert_eq!(e["event.duration"], 2_000_000);
        assert_eq!(e["user.roles"], serde_json::json!(["dev"]));
        assert_eq!(e["source.ip"], "127.0.0.1");
        assert_eq!(e["http.request.id"], "r1");
        let mut ok = op("GET", "/v2/a/b/manifests/v1", None);
        ok.digest = Some("sha256:bb".into());
        let (_, outcome, e) = ok.event(&info, 200, Duration::ZERO).unwrap();
        assert_eq!(outcome, "success");
        assert_eq!(e["tag"], "v1");
        assert_eq!(e["digest"], "sha256:bb");
        assert!(e.get("event.reason").is_none());
    }
}
