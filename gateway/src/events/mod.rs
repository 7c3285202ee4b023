//! Registry events and their delivery: every change to what the registry holds (a manifest
//! pushed, a tag moved, a manifest or tag deleted) becomes an [`Event`] with who made it, from
//! where, and what changed. It is written to the [`outbox`] in the shared state store before
//! the client gets its answer — a change whose event cannot be written is answered 503 (the
//! client retries, and its retry is recorded) — and [`delivery`] takes the outbox to every
//! consumer at least once, in order: each `[[webhooks]]` endpoint (with the event's id for
//! idempotency) and each `[[replication]]` rule.
//!
//! - [`outbox`]: the durable, ordered log of events in the state store.
//! - [`delivery`]: the one delivery loop per consumer in a deployment (lease, retries, dead
//!   letters, replays); [`consumer`]: what every consumer's table shares (its name, back-off).
//! - [`webhooks`]: the endpoints' configuration and the formats (CloudEvents,
//!   distribution's notification envelope).
//! - [`replication`]: the rules that keep another registry holding what this one holds
//!   (per event, and by reconciliation); [`target`] is that registry as a client.

pub mod consumer;
pub mod delivery;
pub mod outbox;
pub mod replication;
pub mod target;
pub mod webhooks;

use crate::audit::request::{Operation, RequestInfo};
use oci::{Endpoint, Reference};
use serde::{Deserialize, Serialize};

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A manifest stored (by digest, or under a tag that was new or already pointed at it).
    ManifestPushed,
    /// A tag now points at another manifest.
    TagMoved,
    /// A manifest deleted by digest (and every tag on it).
    ManifestDeleted,
    /// A tag deleted.
    TagDeleted,
}

impl Kind {
    /// The name filters and CloudEvents types use (`push`, `tag-move`, `delete`, `tag-delete`).
    pub fn action(self) -> &'static str {
        match self {
            Kind::ManifestPushed => "push",
            Kind::TagMoved => "tag-move",
            Kind::ManifestDeleted => "delete",
            Kind::TagDeleted => "tag-delete",
        }
    }

    /// Distribution's notification action: `push` or `delete`.
    fn distribution_action(self) -> &'static str {
        match self {
            Kind::ManifestPushed | Kind::TagMoved => "push",
            Kind::ManifestDeleted | Kind::TagDeleted => "delete",
        }
    }
}

/// Who made a change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    /// `user`, `robot`, `ci` or `anonymous`.
    pub kind: String,
}

/// One registry change, as recorded and delivered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Event {
    /// Unique and stable: every delivery of this event carries it (idempotency).
    pub id: String,
    /// RFC 3339 UTC, when the gateway answered the change.
    pub time: String,
    pub kind: Kind,
    pub actor: Actor,
    /// The client's address.
    pub source: Option<String>,
    pub repository: String,
    pub tag: Option<String>,
    /// The manifest the change is about (pushed, or deleted by digest).
    pub digest: Option<String>,
    /// What the tag pointed at before (a move).
    pub previous_digest: Option<String>,
    pub media_type: Option<String>,
    /// The manifest's size in bytes (a push).
    pub size: Option<u64>,
    pub request_id: String,
    pub user_agent: Option<String>,
    /// The registry host the client used (as it said: informational, never a link).
    pub host: Option<String>,
}

impl Event {
    /// The event a `/v2/` request answered `status` makes, if it changed something: a
    /// manifest PUT answered 201, a manifest DELETE answered 202. `content_type` and
    /// `content_length` are the request's (a pushed manifest's).
    pub fn of(
        op: &Operation,
        info: &RequestInfo,
        status: u16,
        content_type: Option<&str>,
        content_length: Option<u64>,
        host: Option<&str>,
    ) -> Option<Event> {
        let user = op.user.as_ref()?;
        let (kind, repository, tag, digest) = match (op.endpoint.as_ref()?, status) {
            (Endpoint::PutManifest { name, reference }, 201) => {
                let tag = match reference {
                    Reference::Tag(t) => Some(t.to_string()),
                    Reference::Digest(_) => None,
                };
                let moved = tag.is_some()
                    && op
                        .previous_digest
                        .as_ref()
                        .is_some_and(|p| Some(p) != op.digest.as_ref());
                let kind = if moved {
                    Kind::TagMoved
                } else {
                    Kind::ManifestPushed
                };
                (kind, name.to_string(), tag, op.digest.clone())
            }
            (Endpoint::DeleteManifest { name, reference }, 202) => match reference {
                Reference::Tag(t) => (
                    Kind::TagDeleted,
                    name.to_string(),
                    Some(t.to_string()),
                    op.digest.clone(),
                ),
                Reference::Digest(d) => (
                    Kind::ManifestDeleted,
                    name.to_string(),
                    None,
                    Some(d.to_string()),
                ),
            },
            _ => return None,
        };
        let pushed = matches!(kind, Kind::ManifestPushed | Kind::TagMoved);
        Some(Event {
            id: crate::random::random_token(16),
            time: service::time::rfc3339(std::time::SystemTime::now()),
            kind,
            actor: Actor {
                name: user.name.clone(),
                kind: user.kind.clone(),
            },
            source: info.source_ip.clone(),
            repository,
            tag,
            digest,
            previous_digest: op
                .previous_digest
                .clone()
                .filter(|_| kind == Kind::TagMoved),
            media_type: content_type.filter(|_| pushed).map(str::to_owned),
            size: content_length.filter(|_| pushed),
            request_id: info.request_id.clone(),
            user_agent: info.user_agent.clone(),
            host: host.map(str::to_owned),
        })
    }

    /// The event of a change the gateway made itself (the web console's deletes), by `actor`.
    pub fn made_here(
        kind: Kind,
        actor: Actor,
        repository: &str,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Event {
        Event {
            id: crate::random::random_token(16),
            time: service::time::rfc3339(std::time::SystemTime::now()),
            kind,
            actor,
            source: None,
            repository: repository.to_owned(),
            tag: tag.map(str::to_owned),
            digest: digest.map(str::to_owned),
            previous_digest: None,
            media_type: None,
            size: None,
            request_id: String::new(),
            user_agent: Some("portcullis web console".into()),
            host: None,
        }
    }

    /// As a CloudEvents 1.0 JSON object (structured mode).
    pub fn cloudevent(&self) -> serde_json::Value {
        serde_json::json!({
            "specversion": "1.0",
            "id": self.id,
            "source": format!("/portcullis/{}", crate::audit::hostname()),
            "type": format!("io.portcullis.registry.{}", self.kind.action()),
            "subject": self.repository,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": self,
        })
    }

    /// As one event of distribution's notification envelope (`{"events": [...]}`), so tools
    /// written for registry:2 read it.
    pub fn distribution(&self) -> serde_json::Value {
        let mut target = serde_json::json!({
            "repository": self.repository,
        });
        if let Some(d) = &self.digest {
            target["digest"] = d.clone().into();
        }
        if let Some(t) = &self.tag {
            target["tag"] = t.clone().into();
        }
        if let Some(m) = &self.media_type {
            target["mediaType"] = m.clone().into();
        }
        if let Some(s) = self.size {
            target["size"] = s.into();
            target["length"] = s.into();
        }
        serde_json::json!({
            "id": self.id,
            "timestamp": self.time,
            "action": self.kind.distribution_action(),
            "target": target,
            "request": {
                "id": self.request_id,
                "addr": self.source,
                "host": self.host,
                "method": match self.kind {
                    Kind::ManifestPushed | Kind::TagMoved => "PUT",
                    _ => "DELETE",
                },
                "useragent": self.user_agent,
            },
            "actor": {"name": self.actor.name},
            "source": {"addr": self.host, "instanceID": crate::audit::hostname()},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::request::User;

    fn op(method_endpoint: Endpoint, previous: Option<&str>, digest: &str) -> Operation {
        Operation {
            endpoint: Some(method_endpoint),
            user: Some(User {
                name: "bob".into(),
                kind: "user".into(),
                groups: vec![],
            }),
            previous_digest: previous.map(str::to_owned),
            digest: Some(digest.into()),
            ..Default::default()
        }
    }

    fn put(reference: &str) -> Endpoint {
        Endpoint::PutManifest {
            name: oci::RepositoryName::parse("team-a/app").unwrap(),
            reference: Reference::parse(reference).unwrap(),
        }
    }

    #[test]
    fn changes_make_events_and_nothing_else_does() {
        let info = RequestInfo {
            request_id: "r1".into(),
            source_ip: Some("10.0.0.1".into()),
            ..Default::default()
        };
        let ev = |o: &Operation, status| Event::of(o, &info, status, None, Some(7), Some("reg"));
        let new = ev(&op(put("v1"), None, "sha256:aa"), 201).unwrap();
        assert_eq!(new.kind, Kind::ManifestPushed);
        assert_eq!(new.tag.as_deref(), Some("v1"));
        assert_eq!(new.actor.name, "bob");
        assert_eq!(new.source.as_deref(), Some("10.0.0.1"));
        assert_eq!(new.size, Some(7));
        let moved = ev(&op(put("v1"), Some("sha256:bb"), "sha256:aa"), 201).unwrap();
        assert_eq!(moved.kind, Kind::TagMoved);
        assert_eq!(moved.previous_digest.as_deref(), Some("sha256:bb"));
        let same = ev(&op(put("v1"), Some("sha256:aa"), "sha256:aa"), 201).unwrap();
        assert_eq!(same.kind, Kind::ManifestPushed, "the tag did not move");
        assert!(
            ev(&op(put("v1"), None, "sha256:aa"), 400).is_none(),
            "refused"
        );
        let delete = Endpoint::DeleteManifest {
            name: oci::RepositoryName::parse("team-a/app").unwrap(),
            reference: Reference::parse("v1").unwrap(),
        };
        let gone = ev(&op(delete, None, "sha256:aa"), 202).unwrap();
        assert_eq!(gone.kind, Kind::TagDeleted);
        assert_ne!(gone.id, new.id, "every event its own id");
        let pull = Endpoint::GetManifest {
            name: oci::RepositoryName::parse("team-a/app").unwrap(),
            reference: Reference::parse("v1").unwrap(),
            head: false,
        };
        assert!(ev(&op(pull, None, "sha256:aa"), 200).is_none());
    }

    #[test]
    fn both_formats_carry_the_id_actor_and_target() {
        let info = RequestInfo::default();
        let e = Event::of(
            &op(put("v1"), None, "sha256:aa"),
            &info,
            201,
            Some("application/vnd.oci.image.manifest.v1+json"),
            Some(9),
            Some("reg.example"),
        )
        .unwrap();
        let ce = e.cloudevent();
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], e.id.as_str());
        assert_eq!(ce["type"], "io.portcullis.registry.push");
        assert_eq!(ce["data"]["actor"]["name"], "bob");
        let d = e.distribution();
        assert_eq!(d["action"], "push");
        assert_eq!(d["target"]["tag"], "v1");
        assert_eq!(d["target"]["digest"], "sha256:aa");
        assert_eq!(d["actor"]["name"], "bob");
    }
}
