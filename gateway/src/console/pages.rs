//! The console's pages, as compiled templates (maud escapes everything it interpolates:
//! repository names, tags, annotations and digests come from pushers). No script anywhere;
//! forms post with the session's CSRF token.

use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

/// The signed-in person, as pages show them.
pub struct Who<'a> {
    pub name: &'a str,
    pub csrf: &'a str,
    /// A registry administrator (the header links the administration pages).
    pub admin: bool,
}

/// Every page: head, header (with sign-out when signed in), main.
pub fn layout(title: &str, who: Option<&Who<'_>>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Portcullis" }
                link rel="stylesheet" href="/ui/static/style.css";
            }
            body {
                header {
                    a.brand href="/ui/" { "Portcullis" }
                    @if let Some(w) = who {
                        nav {
                            a href="/ui/" { "Repositories" }
                            a href="/ui/account" { "Account" }
                            @if w.admin {
                                a href="/ui/admin/robots" { "Robots" }
                                a href="/ui/admin/audit" { "Audit" }
                                a href="/ui/admin/policy" { "Policy" }
                                a href="/ui/admin/storage" { "Storage" }
                                a href="/ui/admin/events" { "Events" }
                            }
                            span.user { (w.name) }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(w.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

pub fn login(csrf: &str, error: Option<&str>, sso: bool) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            section.card.narrow {
                h1 { "Sign in" }
                @if let Some(e) = error {
                    p.error role="alert" { (e) }
                }
                form method="post" action="/ui/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="username" { "User name" }
                    input #username type="text" name="username" autocomplete="username" required;
                    label for="password" { "Password" }
                    input #password type="password" name="password" autocomplete="current-password" required;
                    button #sign-in type="submit" { "Sign in" }
                }
                @if sso {
                    p { a #sso href="/ui/sso" { "Sign in with single sign-on" } }
                }
            }
        },
    )
}

/// A page that moves on to `to` by itself (and says where, for a browser that does not).
pub fn continue_to(to: &str, title: &str, text: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={ "0; url=" (to) };
                title { (title) " · Portcullis" }
            }
            body { p { (text) " " a href=(to) { "Continue" } } }
        }
    }
}

/// One repository row of the list.
pub fn repositories(who: &Who<'_>, q: &str, names: &[String], next: Option<&str>) -> Markup {
    layout(
        "Repositories",
        Some(who),
        html! {
            h1 { "Repositories" }
            form.search method="get" action="/ui/" role="search" {
                label for="q" { "Name starts with" }
                input #q type="search" name="q" value=(q);
                button type="submit" { "Search" }
            }
            @if names.is_empty() {
                p.empty { "No repositories you may pull" @if !q.is_empty() { " starting with " code { (q) } } "." }
            } @else {
                ul.list #repositories {
                    @for n in names {
                        li { a href={ "/ui/repo?name=" (enc(n)) } { (n) } }
                    }
                }
            }
            @if let Some(last) = next {
                p.more { a href={ "/ui/?q=" (enc(q)) "&last=" (enc(last)) } { "More" } }
            }
        },
    )
}

/// A tag of the repository page.
pub struct TagRow {
    pub tag: String,
    pub digest: String,
    pub media_type: String,
    pub size: usize,
    /// What it holds: an image's size, an index's platforms ([`contents`]).
    pub contents: String,
    /// The immutability rule that holds it, if any.
    pub immutable: Option<String>,
    /// When and by whom it was last pushed, if the audit trail's window tells.
    pub pushed: Option<(String, String)>,
}

pub fn repository(
    who: &Who<'_>,
    host: &str,
    repo: &str,
    tags: &[TagRow],
    next: Option<&str>,
    may_delete: bool,
    notice: Option<&str>,
) -> Markup {
    layout(
        repo,
        Some(who),
        html! {
            h1 { (repo) }
            @if let Some(n) = notice {
                p.notice role="status" { (n) }
            }
            p { "Pull: " code.copy { "docker pull " (host) "/" (repo) ":<tag>" } }
            @if tags.is_empty() {
                p.empty { "No tags." }
            } @else {
                table #tags {
                    thead { tr { th { "Tag" } th { "Digest" } th { "Type" } th { "Contents" } th { "Pushed" } th {} } }
                    tbody {
                        @for t in tags {
                            tr {
                                td {
                                    a href={ "/ui/manifest?name=" (enc(repo)) "&ref=" (enc(&t.tag)) } { (t.tag) }
                                    @if let Some(rule) = &t.immutable {
                                        " " span.badge title=(rule) { "immutable" }
                                    }
                                }
                                td { code { (short(&t.digest)) } }
                                td { (kind(&t.media_type)) }
                                td title={ "manifest: " (t.size) " B" } { (t.contents) }
                                td.pushed {
                                    @if let Some((at, by)) = &t.pushed {
                                        (at.get(..16).unwrap_or(at).replace('T', " ")) " by " (by)
                                    } @else { "—" }
                                }
                                td {
                                    @if may_delete {
                                        form method="post" action="/ui/delete-tag" {
                                            input type="hidden" name="csrf" value=(who.csrf);
                                            input type="hidden" name="name" value=(repo);
                                            input type="hidden" name="tag" value=(t.tag);
                                            button.danger type="submit" aria-label={ "Delete tag " (t.tag) } { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(last) = next {
                p.more { a href={ "/ui/repo?name=" (enc(repo)) "&last=" (enc(last)) } { "More tags" } }
            }
        },
    )
}

pub fn manifest(
    who: &Who<'_>,
    host: &str,
    repo: &str,
    reference: &str,
    m: &crate::registry::data::Manifest,
    referrers: &[Value],
    may_delete: bool,
) -> Markup {
    let v: Value = serde_json::from_slice(&m.body).unwrap_or(Value::Null);
    let digest = m.digest.to_string();
    html! {
        (layout(
            &format!("{repo}:{reference}"),
            Some(who),
            html! {
                p.crumbs { a href={ "/ui/repo?name=" (enc(repo)) } { (repo) } " / " (reference) }
                h1 { (repo) " " code { (reference) } }
                dl.facts {
                    dt { "Digest" } dd { code #digest { (digest) } }
                    dt { "Media type" } dd { (m.media_type) }
                    dt { "Pull" } dd { code.copy { "docker pull " (host) "/" (repo) "@" (digest) } }
                }
                @if may_delete {
                    form #delete-manifest method="post" action="/ui/delete-manifest" {
                        input type="hidden" name="csrf" value=(who.csrf);
                        input type="hidden" name="name" value=(repo);
                        input type="hidden" name="digest" value=(digest);
                        button.danger type="submit" aria-label="Delete this manifest" { "Delete manifest (every tag on it)" }
                    }
                }
                @if let Some(children) = v["manifests"].as_array() {
                    h2 { "Platforms" }
                    table #platforms {
                        thead { tr { th { "Platform" } th { "Manifest" } th { "Size" } } }
                        tbody {
                            @for c in children {
                                @let d = c["digest"].as_str().unwrap_or("");
                                tr {
                                    td { (platform(c)) }
                                    td { a href={ "/ui/manifest?name=" (enc(repo)) "&ref=" (enc(d)) } { code { (short(d)) } } }
                                    td { (c["size"].as_u64().unwrap_or(0)) " B" }
                                }
                            }
                        }
                    }
                }
                @if v["config"].is_object() {
                    h2 { "Config" }
                    p { code { (v["config"]["digest"].as_str().unwrap_or("")) } " · " (v["config"]["size"].as_u64().unwrap_or(0)) " B" }
                }
                @if let Some(layers) = v["layers"].as_array() {
                    h2 { "Layers" }
                    table #layers {
                        thead { tr { th { "#" } th { "Digest" } th { "Type" } th { "Size" } } }
                        tbody {
                            @for (i, l) in layers.iter().enumerate() {
                                tr {
                                    td { (i + 1) }
                                    td { code { (l["digest"].as_str().unwrap_or("")) } }
                                    td { (l["mediaType"].as_str().unwrap_or("")) }
                                    td { (size(l["size"].as_u64().unwrap_or(0))) }
                                }
                            }
                        }
                    }
                }
                @if let Some(a) = v["annotations"].as_object() {
                    h2 { "Annotations" }
                    dl.facts #annotations {
                        @for (k, val) in a {
                            dt { (k) } dd { (val.as_str().map_or_else(|| val.to_string(), str::to_owned)) }
                        }
                    }
                }
                h2 { "Referrers" }
                @if referrers.is_empty() {
                    p.empty { "No signatures, SBOMs or attestations refer to it." }
                } @else {
                    table #referrers {
                        thead { tr { th { "Artifact type" } th { "Manifest" } th { "Size" } } }
                        tbody {
                            @for r in referrers {
                                @let d = r["digest"].as_str().unwrap_or("");
                                tr {
                                    td { (r["artifactType"].as_str().unwrap_or("(none)")) }
                                    td { a href={ "/ui/manifest?name=" (enc(repo)) "&ref=" (enc(d)) } { code { (short(d)) } } }
                                    td { (r["size"].as_u64().unwrap_or(0)) " B" }
                                }
                            }
                        }
                    }
                }
            },
        ))
    }
}

/// The person's sessions (this browser's marked) and how to log in with docker.
pub fn account(
    who: &Who<'_>,
    host: &str,
    sessions: &[crate::token::refresh::SessionInfo],
    current: &str,
    notice: Option<&str>,
) -> Markup {
    layout(
        "Account",
        Some(who),
        html! {
            h1 { "Account" }
            @if let Some(n) = notice {
                p.notice role="status" { (n) }
            }
            h2 { "Sessions and devices" }
            p { "Every sign-in — docker and podman logins with a device token, single sign-on, this console — is a session. Revoke one and its device must sign in again." }
            table #sessions {
                thead { tr { th { "Device" } th { "How" } th { "Since" } th { "Last used" } th {} } }
                tbody {
                    @for s in sessions {
                        tr {
                            td { (s.device) @if s.id == current { " " span.badge { "this browser" } } }
                            td { (s.source) }
                            td { (when(s.created_at)) }
                            td { (when(s.last_used_at)) }
                            td {
                                form method="post" action="/ui/revoke-session" {
                                    input type="hidden" name="csrf" value=(who.csrf);
                                    input type="hidden" name="id" value=(s.id);
                                    button.danger type="submit" aria-label={ "Revoke session " (s.id) } { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Logging in with docker" }
            p {
                "With single sign-on, the credential helper "
                code { "docker-credential-portcullis" }
                " signs you in from a terminal (set it in "
                code { "credHelpers" }
                " of " code { "~/.docker/config.json" } " for " code { (host) } "). "
                "With a password: " code.copy { "docker login " (host) " -u " (who.name) }
                "."
            }
        },
    )
}

/// The robot accounts (administrators), a new or rotated secret shown once.
pub fn robots(
    who: &Who<'_>,
    robots: &[Value],
    secret: Option<&(String, String)>,
    notice: Option<&str>,
) -> Markup {
    layout(
        "Robots",
        Some(who),
        html! {
            h1 { "Robot accounts" }
            @if let Some(n) = notice {
                p.notice role="status" { (n) }
            }
            @if let Some((name, s)) = secret {
                section.card #secret {
                    h2 { "Secret of " code { (name) } }
                    p { "Shown this once: copy it now. " code.copy #robot-secret { (s) } }
                    p { "Use it as " code { "docker login -u '" (name) "'" } " with this secret as the password." }
                }
            }
            @if robots.is_empty() {
                p.empty { "No robot accounts." }
            } @else {
                table #robots {
                    thead { tr { th { "Robot" } th { "Scope" } th { "Expires" } th { "Secrets" } th {} } }
                    tbody {
                        @for r in robots {
                            @let name = r["name"].as_str().unwrap_or("");
                            tr {
                                td {
                                    code { (name) }
                                    @if r["disabled"].as_bool() == Some(true) { " " span.badge { "disabled" } }
                                    @if r["expired"].as_bool() == Some(true) { " " span.badge { "expired" } }
                                }
                                td {
                                    @for e in r["scope"].as_array().cloned().unwrap_or_default() {
                                        div {
                                            (e["repositories"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default())
                                            ": "
                                            (e["actions"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default())
                                        }
                                    }
                                }
                                td { (r["expires_at"].as_i64().map_or_else(|| "never".to_owned(), when)) }
                                td { (r["secrets"].as_array().map_or(0, Vec::len)) }
                                td.actions {
                                    form method="post" action="/ui/admin/robots/rotate" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="robot" value=(name);
                                        button type="submit" aria-label={ "Rotate " (name) } { "Rotate" }
                                    }
                                    @let disabled = r["disabled"].as_bool() == Some(true);
                                    form method="post" action="/ui/admin/robots/disable" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="robot" value=(name);
                                        input type="hidden" name="disabled" value=(if disabled { "false" } else { "true" });
                                        @if disabled {
                                            button type="submit" aria-label={ "Enable " (name) } { "Enable" }
                                        } @else {
                                            button type="submit" aria-label={ "Disable " (name) } { "Disable" }
                                        }
                                    }
                                    form method="post" action="/ui/admin/robots/delete" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="robot" value=(name);
                                        button.danger type="submit" aria-label={ "Delete " (name) } { "Delete" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            h2 { "New robot" }
            form.card #new-robot method="post" action="/ui/admin/robots/create" {
                input type="hidden" name="csrf" value=(who.csrf);
                label for="project" { "Project" }
                input #project type="text" name="project" required;
                label for="robot-name" { "Name" }
                input #robot-name type="text" name="name" required;
                label for="repositories" { "Repositories (patterns, comma-separated)" }
                input #repositories type="text" name="repositories" required;
                fieldset {
                    legend { "Actions" }
                    label { input #pull type="checkbox" name="pull" checked; " pull" }
                    label { input #push type="checkbox" name="push"; " push" }
                    label { input #delete type="checkbox" name="delete"; " delete" }
                }
                label for="expires_days" { "Expires in (days)" }
                input #expires_days type="text" name="expires_days" value="90";
                label for="description" { "Description" }
                input #description type="text" name="description";
                button #create-robot type="submit" { "Create" }
            }
        },
    )
}

/// The audit trail search (administrators): the form, then the newest matching events.
pub fn audit(
    who: &Who<'_>,
    s: &super::trail::Search,
    found: Result<(Vec<Value>, bool), String>,
) -> Markup {
    let field = |e: &Value, k: &str| e[k].as_str().unwrap_or("").to_owned();
    layout(
        "Audit trail",
        Some(who),
        html! {
            h1 { "Audit trail" }
            form.search #audit-search method="get" action="/ui/admin/audit" {
                label for="user" { "User" }
                input #user type="text" name="user" value=(s.user);
                label for="repository" { "Repository (or namespace)" }
                input #repository type="text" name="repository" value=(s.repository);
                label for="action" { "Action (e.g. manifest-push, tag-delete, login)" }
                input #action type="text" name="action" value=(s.action);
                label for="since" { "Since (RFC 3339 or a date)" }
                input #since type="text" name="since" value=(s.since);
                label for="until" { "Until" }
                input #until type="text" name="until" value=(s.until);
                button #search type="submit" { "Search" }
            }
            @match found {
                Err(why) => p.error role="alert" { (why) },
                Ok((events, partial)) => {
                    @if events.is_empty() {
                        p.empty { "No events match." }
                    } @else {
                        table #events {
                            thead { tr { th { "Time" } th { "Action" } th { "Outcome" } th { "User" } th { "Repository" } th { "Tag / digest" } th { "Source" } th { "Reason" } } }
                            tbody {
                                @for e in &events {
                                    tr {
                                        td { (field(e, "@timestamp")) }
                                        td { (field(e, "event.action")) }
                                        td { (field(e, "event.outcome")) }
                                        td { (field(e, "user.name")) }
                                        td { (field(e, "repository")) }
                                        td { code { (field(e, "tag")) " " (field(e, "digest")) } }
                                        td { (field(e, "source.ip")) }
                                        td { (field(e, "event.reason")) }
                                    }
                                }
                            }
                        }
                    }
                    @if partial {
                        p.more { "Older events are beyond what the console reads (the trail's last 32 MiB); search them where the trail is ingested." }
                    }
                }
            }
        },
    )
}

/// A question to the policy: may `user` (of `kind`, in `groups`) do `action` on `target`
/// (`repository` or `repository:tag`)?
pub struct Explain {
    pub user: String,
    pub kind: String,
    pub groups: String,
    pub action: String,
    pub target: String,
}

/// The policy in force (administrators): the explain form and its answer, then the text.
pub fn policy(
    who: &Who<'_>,
    text: &str,
    source: &str,
    ask: &Explain,
    answer: Option<&Result<(bool, String), String>>,
) -> Markup {
    let kinds = ["user", "robot", "ci", "anonymous"];
    let actions = ["pull", "push", "delete", "catalog", "override-immutable"];
    layout(
        "Policy",
        Some(who),
        html! {
            h1 { "Policy" }
            form.search #explain method="get" action="/ui/admin/policy" {
                label for="user" { "Who (user, robot or CI identity)" }
                input #user type="text" name="user" value=(ask.user);
                label for="kind" { "Kind" }
                select #kind name="kind" {
                    @for k in kinds {
                        option value=(k) selected[ask.kind == k] { (k) }
                    }
                }
                label for="groups" { "Groups (comma-separated)" }
                input #groups type="text" name="groups" value=(ask.groups);
                label for="action" { "Action" }
                select #action name="action" {
                    @for a in actions {
                        option value=(a) selected[ask.action == a] { (a) }
                    }
                }
                label for="target" { "Repository (or repository:tag)" }
                input #target type="text" name="target" value=(ask.target);
                button #ask type="submit" { "Explain" }
            }
            @match answer {
                None => {},
                Some(Err(why)) => p.error role="alert" { (why) },
                Some(Ok((allowed, why))) => {
                    p #verdict .notice role="status" {
                        strong { @if *allowed { "Allowed" } @else { "Denied" } }
                        ": " (why)
                    }
                },
            }
            h2 { "In force" }
            @if source == "built in" {
                p { "The embedded default's built-in policy (give " code { "[policy] file" } " to change it)." }
            } @else {
                p { "From " code { (source) } " (reloaded on SIGHUP; edit the file, not this page)." }
            }
            pre #policy-text { (text) }
        },
    )
}

/// The outbox's consumers (webhooks, replication rules: key, what it is, cursor) and dead
/// letters (administrators).
pub fn events(
    who: &Who<'_>,
    head: u64,
    hooks: &[(String, String, Option<u64>)],
    letters: &[crate::events::outbox::DeadLetter],
    notice: Option<&str>,
) -> Markup {
    layout(
        "Events",
        Some(who),
        html! {
            h1 { "Events" }
            @if let Some(n) = notice {
                p.notice role="status" { (n) }
            }
            p { "Events recorded so far: " strong #head { (head) } " (numbered in the outbox)." }
            table #webhooks {
                thead { tr { th { "Consumer" } th { "What" } th { "Took up to" } th { "Not taken yet" } } }
                tbody {
                    @for (name, what, cursor) in hooks {
                        tr {
                            td { code { (name) } }
                            td { (what) }
                            td { @match cursor { Some(c) => (c), None => "—" } }
                            td { @match cursor { Some(c) => (head.saturating_sub(*c)), None => "—" } }
                        }
                    }
                }
            }
            h2 { "Dead letters" }
            @if letters.is_empty() {
                p.empty { "None: every consumer took every event it wanted." }
            } @else {
                table #dead-letters {
                    thead { tr { th { "Consumer" } th { "Event" } th { "Repository" } th { "What" } th { "Attempts" } th { "Last error" } th {} } }
                    tbody {
                        @for l in letters {
                            tr {
                                td { code { (l.webhook) } }
                                td { code { (l.seq) } " " (l.event.time) }
                                td { (l.event.repository) }
                                td { (l.event.kind.action()) " " (l.event.tag.as_deref().unwrap_or("")) " by " (l.event.actor.name) }
                                td { (l.attempts) }
                                td { (l.error) }
                                td {
                                    form method="post" action="/ui/admin/events/replay" {
                                        input type="hidden" name="csrf" value=(who.csrf);
                                        input type="hidden" name="webhook" value=(l.webhook);
                                        input type="hidden" name="seq" value=(l.seq);
                                        button type="submit" aria-label={ "Replay " (l.webhook) " " (l.seq) } { "Replay" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The storage nodes (administrators): health, usage, recent GC runs.
pub fn storage(who: &Who<'_>, nodes: &[crate::registry::internal::NodeStatus]) -> Markup {
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    layout(
        "Storage",
        Some(who),
        html! {
            h1 { "Storage" }
            @if nodes.is_empty() {
                p.empty { "This gateway knows no storage node." }
            }
            @for node in nodes {
                section.card.node {
                    h2 { code { (node.addr) } " "
                        @if node.healthy { span.badge { "healthy" } } @else { span.badge.bad { "failing its health check" } }
                    }
                    @match &node.status {
                        Err(why) => p.error { "No status: " (why) },
                        Ok(st) => {
                            @if st["ready"] != Value::Bool(true) {
                                p.error { "Its store does not answer." }
                            }
                            @if st["usage"].is_object() {
                                p { "Usage: " strong { (n(&st["usage"]["blobs"])) " blobs, " (size(n(&st["usage"]["bytes"]))) }
                                    " (walked at " (when(n(&st["usage"]["measured_at"]) as i64)) ", kept up to date since)" }
                            } @else {
                                p { "Usage: not measured yet." }
                            }
                            @let runs = st["gc"].as_array().cloned().unwrap_or_default();
                            @if runs.is_empty() {
                                p.empty { "No garbage collection run on this node since it started." }
                            } @else {
                                table.gc {
                                    thead { tr { th { "Finished" } th { "Kind" } th { "Blobs seen" } th { "Blobs deleted" } th { "Reclaimed" } th { "Manifests deleted" } th { "Errors" } } }
                                    tbody {
                                        @for r in &runs {
                                            tr {
                                                td { (r["finished"].as_str().unwrap_or("")) }
                                                td { @if r["busy"].is_string() { "skipped (another node's run)" }
                                                     @else if r["dry_run"] == Value::Bool(true) { "dry run" } @else { "run" }
                                                     @if r["complete"] == Value::Bool(false) { " (incomplete)" } }
                                                td { (n(&r["blobs_seen"])) }
                                                td { (n(&r["blobs_deleted"])) }
                                                td { (size(n(&r["bytes_reclaimed"]))) }
                                                td { (n(&r["manifests_deleted"])) }
                                                td { (n(&r["errors"])) }
                                            }
                                        }
                                    }
                                }
                            }
                        },
                    }
                }
            }
        },
    )
}

/// A Unix time as RFC 3339 UTC.
fn when(t: i64) -> String {
    service::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.max(0) as u64))
}

pub fn message(who: Option<&Who<'_>>, title: &str, text: &str) -> Markup {
    layout(
        title,
        who,
        html! {
            section.card.narrow {
                h1 { (title) }
                p { (text) }
                p { a href="/ui/" { "Back to the repositories" } }
            }
        },
    )
}

/// A query-string value.
fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `sha256:0123456789ab…`.
fn short(digest: &str) -> String {
    match digest.split_once(':') {
        Some((alg, hex)) if hex.len() > 12 => format!("{alg}:{}…", &hex[..12]),
        _ => digest.to_owned(),
    }
}

fn kind(media_type: &str) -> &'static str {
    if media_type.contains("index") || media_type.contains("list") {
        "index"
    } else if media_type.is_empty() {
        "?"
    } else {
        "image"
    }
}

/// What a manifest holds, in a few words: an index's platforms (attestations left out), an
/// image's total size (config and layers), an artifact's type.
pub fn contents(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if let Some(children) = v["manifests"].as_array() {
        let platforms: Vec<String> = children
            .iter()
            .filter(|c| {
                c["platform"]["os"]
                    .as_str()
                    .is_some_and(|os| os != "unknown")
            })
            .map(platform)
            .collect();
        return if platforms.is_empty() {
            format!("index of {}", children.len())
        } else {
            platforms.join(", ")
        };
    }
    let layers = v["layers"].as_array().cloned().unwrap_or_default();
    let total = v["config"]["size"].as_u64().unwrap_or(0)
        + layers
            .iter()
            .filter_map(|l| l["size"].as_u64())
            .sum::<u64>();
    match v["artifactType"].as_str() {
        Some(t) => format!("{t}, {}", size(total)),
        None => format!(
            "{}, {} layer{}",
            size(total),
            layers.len(),
            if layers.len() == 1 { "" } else { "s" }
        ),
    }
}

fn platform(c: &Value) -> String {
    let p = &c["platform"];
    let mut s = format!(
        "{}/{}",
        p["os"].as_str().unwrap_or("?"),
        p["architecture"].as_str().unwrap_or("?")
    );
    if let Some(v) = p["variant"].as_str() {
        s.push('/');
        s.push_str(v);
    }
    s
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_pushers_wrote_is_shown_inert() {
        let who = Who {
            name: "bob",
            csrf: "c",
            admin: false,
        };
        let evil = "<script>alert(1)</script>";
        let page = repositories(&who, evil, &[format!("a/{evil}")], Some(evil)).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;"));
        let m = crate::registry::data::Manifest {
            digest: oci::Digest::of(oci::Algorithm::Sha256, b"x"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            body: bytes::Bytes::from(
                serde_json::json!({
                    "schemaVersion": 2,
                    "layers": [],
                    "annotations": {"org.opencontainers.image.title": evil, evil: "x"}
                })
                .to_string(),
            ),
        };
        let page = manifest(&who, "h", "r", evil, &m, &[], true).into_string();
        assert!(!page.contains("<script>"), "{page}");
        assert_eq!(size(1536), "1.5 KiB");
        assert!(when(0).starts_with("1970-01-01T00:00:00"));
        assert_eq!(short("sha256:0123456789abcdef"), "sha256:0123456789ab…");
    }
}
