//! The robot accounts' admin API (`/admin/robots`): list, create (the secret shown once),
//! change, disable, delete and rotate, each decided by who calls ([`Caller`]).

use super::{
    Caller, KEY_PREFIX, PREFIX, Robot, Robots, Secret, error, percent_decode, project_of,
    store_error, valid_part,
};
use crate::auth::scope::{Scope, ScopeEntry};
use crate::clock::unix_now;
use crate::reply::Reply;
use serde::Deserialize;
use serde_json::json;

/// The create request of the admin API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    project: String,
    name: String,
    #[serde(default)]
    description: String,
    scope: Vec<ScopeEntry>,
    #[serde(default)]
    expires_in_seconds: Option<u64>,
    #[serde(default)]
    never_expires: bool,
    #[serde(default)]
    may_create_robots: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRequest {
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    #[serde(default)]
    overlap_seconds: Option<u64>,
}

impl Robots {
    /// The admin API: `GET|POST /admin/robots`, `GET|PATCH|DELETE /admin/robots/<name>`,
    /// `POST /admin/robots/<name>/rotate`. `rest` is the path after [`crate::route::ROBOTS_PATH`].
    pub async fn api(&self, method: &str, rest: &str, body: &[u8], caller: &Caller) -> Reply {
        let now = unix_now();
        let rest = rest.trim_matches('/');
        let (name, verb) = match rest.split_once('/') {
            Some((n, v)) => (n, v),
            None => (rest, ""),
        };
        let Some(name) = percent_decode(name) else {
            return error(
                400,
                "invalid_request",
                "bad percent-encoding in the robot name",
            );
        };
        match (method, name.as_str(), verb) {
            ("GET", "", "") => self.list(caller, now).await,
            ("POST", "", "") => self.create(body, caller, now).await,
            (_, "", _) => error(405, "invalid_request", "GET or POST /admin/robots"),
            (method, name, verb) => {
                let robot = match self.load(name).await {
                    Ok(Some(r)) if self.may_manage(caller, &r) => r,
                    Ok(_) => {
                        return error(
                            404,
                            "not_found",
                            "no such robot (among the ones you may manage)",
                        );
                    }
                    Err(e) => return store_error(&e),
                };
                match (method, verb) {
                    ("GET", "") => Reply::json(200, robot.view(now)),
                    ("PATCH", "") => self.patch(robot, body, caller, now).await,
                    ("DELETE", "") => self.delete(robot, caller).await,
                    ("POST", "rotate") => self.rotate(robot, body, caller, now).await,
                    _ => error(
                        405,
                        "invalid_request",
                        "GET, PATCH or DELETE /admin/robots/<name>, POST /admin/robots/<name>/rotate",
                    ),
                }
            }
        }
    }

    /// Administrators manage every robot; a delegating robot the ones it created.
    fn may_manage(&self, caller: &Caller, r: &Robot) -> bool {
        match caller {
            Caller::Token | Caller::Admin(_) => true,
            Caller::Other(id) => caller.delegating_robot().is_some() && r.created_by == id.subject,
        }
    }

    fn refuse_others(caller: &Caller) -> Option<Reply> {
        match caller {
            Caller::Other(id) if caller.delegating_robot().is_none() => {
                crate::audit::record(
                    "robot-admin",
                    "failure",
                    json!({"user.name": id.subject, "event.reason": "not an administrator"}),
                );
                Some(error(
                    403,
                    "access_denied",
                    "only registry administrators (and robots allowed to) manage robot accounts",
                ))
            }
            _ => None,
        }
    }

    async fn list(&self, caller: &Caller, now: i64) -> Reply {
        if let Some(r) = Self::refuse_others(caller) {
            return r;
        }
        match self.store.scan(KEY_PREFIX).await {
            Ok(entries) => {
                let mut robots: Vec<Robot> = entries
                    .iter()
                    .filter_map(|(_, v)| serde_json::from_slice(v).ok())
                    .filter(|r| self.may_manage(caller, r))
                    .collect();
                robots.sort_by(|a, b| a.name.cmp(&b.name));
                Reply::json(
                    200,
                    json!({"robots": robots.iter().map(|r| r.view(now)).collect::<Vec<_>>()}),
                )
            }
            Err(e) => store_error(&e),
        }
    }

    async fn create(&self, body: &[u8], caller: &Caller, now: i64) -> Reply {
        if let Some(r) = Self::refuse_others(caller) {
            return r;
        }
        let req: CreateRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(400, "invalid_request", &format!("bad robot request: {e}")),
        };
        if !valid_part(&req.project) || !valid_part(&req.name) {
            return error(
                400,
                "invalid_request",
                "project and name: 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit",
            );
        }
        let name = format!("{PREFIX}{}+{}", req.project, req.name);
        let scope = match Scope::compile(&req.scope) {
            Ok(s) => s,
            Err(e) => return error(400, "invalid_scope", &e),
        };
        // One snapshot of `[robots]` for the whole request (a reload applies to the next).
        let settings = self.settings();
        let max = (settings.cfg.max_lifetime_days * 86_400) as i64;
        let expires_at = match (req.never_expires, req.expires_in_seconds) {
            (true, Some(_)) => {
                return error(
                    400,
                    "invalid_request",
                    "give expires_in_seconds or never_expires, not both",
                );
            }
            (true, None) if !settings.cfg.allow_never_expire => {
                return error(
                    400,
                    "invalid_request",
                    "this registry does not allow robots that never expire",
                );
            }
            (true, None) => None,
            (false, Some(s)) if s == 0 || s as i64 > max => {
                return error(
                    400,
                    "invalid_request",
                    &format!("expires_in_seconds must be between 1 and {max}"),
                );
            }
            (false, Some(s)) => Some(now + s as i64),
            // Asked for nothing: the default lifetime, but a delegating robot's robot no
            // longer than the robot itself (else a default child made a second after its
            // parent would outlive it, and be refused below).
            (false, None) => {
                let default = now + (settings.cfg.default_lifetime_days * 86_400) as i64;
                match caller.delegating_robot() {
                    Some((_, Some(limit))) => Some(default.min(limit)),
                    _ => Some(default),
                }
            }
        };
        if let Some((own, own_expiry)) = caller.delegating_robot() {
            let denied = |why: &str| {
                crate::audit::record(
                    "robot-create",
                    "failure",
                    json!({"user.name": caller.name(), "robot": name, "event.reason": why}),
                );
                error(403, "access_denied", why)
            };
            if project_of(caller.name()) != Some(req.project.as_str()) {
                return denied("a robot creates robots of its own project only");
            }
            if !own.covers(&scope) {
                return denied("the requested scope is wider than the creating robot's own");
            }
            if let Some(limit) = own_expiry
                && expires_at.is_none_or(|e| e > limit)
            {
                return denied("a robot's robots must expire no later than itself");
            }
        }
        match self.load(&name).await {
            Ok(Some(_)) => return error(409, "conflict", &format!("{name} already exists")),
            Ok(None) => {}
            Err(e) => return store_error(&e),
        }
        let secret = crate::random::random_token(32);
        let robot = Robot {
            name: name.clone(),
            description: req.description.chars().take(500).collect(),
            scope: req.scope,
            expires_at,
            disabled: false,
            disabled_by_admin: false,
            may_create_robots: req.may_create_robots,
            created_by: caller.name().to_string(),
            created_at: now,
            secrets: vec![Secret {
                hash: self.hash(&name, &secret),
                created_at: now,
                valid_until: None,
            }],
        };
        if let Err(e) = self.save(&robot).await {
            return store_error(&e);
        }
        crate::audit::record(
            "robot-create",
            "success",
            json!({"user.name": caller.name(), "robot": name, "scope": robot.scope, "expires_at": expires_at}),
        );
        let mut view = robot.view(now);
        view["secret"] = json!(secret);
        Reply::json(201, view)
    }

    async fn patch(&self, mut robot: Robot, body: &[u8], caller: &Caller, now: i64) -> Reply {
        let req: PatchRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(400, "invalid_request", &format!("bad robot change: {e}")),
        };
        let admin = matches!(caller, Caller::Token | Caller::Admin(_));
        if let Some(d) = req.disabled {
            if !d && robot.disabled_by_admin && !admin {
                return Self::disabled_by_admin("robot-update", &robot, caller, "enables");
            }
            robot.disabled = d;
            robot.disabled_by_admin = d && (admin || robot.disabled_by_admin);
        }
        if let Some(d) = req.description {
            robot.description = d.chars().take(500).collect();
        }
        if let Err(e) = self.save(&robot).await {
            return store_error(&e);
        }
        crate::audit::record(
            if robot.disabled {
                "robot-disable"
            } else {
                "robot-update"
            },
            "success",
            json!({"user.name": caller.name(), "robot": robot.name}),
        );
        Reply::json(200, robot.view(now))
    }

    /// The refusal (audited) of a change only an administrator may make to a robot an
    /// administrator disabled.
    fn disabled_by_admin(action: &str, robot: &Robot, caller: &Caller, verb: &str) -> Reply {
        crate::audit::record(
            action,
            "failure",
            json!({"user.name": caller.name(), "robot": robot.name,
                   "event.reason": "disabled by an administrator"}),
        );
        error(
            403,
            "access_denied",
            &format!("an administrator disabled this robot; only an administrator {verb} it"),
        )
    }

    async fn delete(&self, robot: Robot, caller: &Caller) -> Reply {
        // Deleting and creating it again would bring back, enabled, what an administrator
        // disabled.
        if robot.disabled_by_admin && !matches!(caller, Caller::Token | Caller::Admin(_)) {
            return Self::disabled_by_admin("robot-delete", &robot, caller, "deletes");
        }
        if let Err(e) = self
            .store
            .delete(&format!("{KEY_PREFIX}{}", robot.name))
            .await
        {
            return store_error(&e);
        }
        crate::audit::record(
            "robot-delete",
            "success",
            json!({"user.name": caller.name(), "robot": robot.name}),
        );
        Reply::json(200, json!({"deleted": robot.name}))
    }

    async fn rotate(&self, mut robot: Robot, body: &[u8], caller: &Caller, now: i64) -> Reply {
        let req: RotateRequest = if body.is_empty() {
            RotateRequest::default()
        } else {
            match serde_json::from_slice(body) {
                Ok(r) => r,
                Err(e) => {
                    return error(400, "invalid_request", &format!("bad rotate request: {e}"));
                }
            }
        };
        let most = self.settings().cfg.rotation_overlap_seconds;
        let overlap = req.overlap_seconds.unwrap_or(most).min(most) as i64;
        // Earlier secrets end at the overlap's end at the latest; ended ones go.
        for s in &mut robot.secrets {
            s.valid_until = Some(
                s.valid_until
                    .map_or(now + overlap, |u| u.min(now + overlap)),
            );
        }
        robot
            .secrets
            .retain(|s| s.valid_until.is_none_or(|u| u > now));
        let secret = crate::random::random_token(32);
        robot.secrets.push(Secret {
            hash: self.hash(&robot.name, &secret),
            created_at: now,
            valid_until: None,
        });
        if let Err(e) = self.save(&robot).await {
            return store_error(&e);
        }
        crate::audit::record(
            "robot-rotate",
            "success",
            json!({"user.name": caller.name(), "robot": robot.name, "overlap_seconds": overlap}),
        );
        let mut view = robot.view(now);
        view["secret"] = json!(secret);
        Reply::json(200, view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Identity, Machine};
    use crate::state::StateStore;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_delegating_robots_child_made_with_the_default_lifetime_expires_with_it() {
        let store: Arc<dyn StateStore> = Arc::new(crate::state::MemoryStore::default());
        let robots = Robots::new(
            store,
            crate::auth::pepper::Peppers::one(b"pepper-for-robot-tests"),
            crate::auth::robots::RobotsConfig::default(),
        )
        .unwrap();
        let made = 1_800_000_000;
        // The parent, made at `made` with the default lifetime.
        let limit = made
            + (crate::auth::robots::RobotsConfig::default().default_lifetime_days * 86_400) as i64;
        let scope = Scope::compile(&[ScopeEntry {
            repositories: vec!["team-a/**".into()],
            actions: vec!["pull".into()],
        }])
        .unwrap();
        let caller = Caller::Other(Identity {
            subject: "robot$team-a+ci".into(),
            groups: vec![],
            kind: policy::SubjectKind::Robot,
            machine: Some(Arc::new(Machine {
                scope: Some(scope),
                not_after: Some(limit),
                may_create_robots: true,
                ..Default::default()
            })),
        });
        // A second later, a child asking for no lifetime: it gets the parent's end, not a
        // refusal for outliving it.
        let r = robots
            .create(
                br#"{"project":"team-a","name":"child","scope":[{"repositories":["team-a/app"],"actions":["pull"]}]}"#,
                &caller,
                made + 1,
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["expires_at"], limit, "{body}");
        // One asking for longer than its parent has left is still refused.
        let r = robots
            .create(
                format!(
                    r#"{{"project":"team-a","name":"longer","expires_in_seconds":{},"scope":[{{"repositories":["team-a/app"],"actions":["pull"]}}]}}"#,
                    limit - made
                )
                .as_bytes(),
                &caller,
                made + 1,
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.body);
    }
}
