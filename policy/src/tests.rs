//! Rules, stated as test names.

use super::*;
use crate::retention::ManifestRecord;

const NOW: i64 = 1_795_000_000; // 2026-11-18

fn compile(text: &str) -> Policy {
    Policy::compile("test.toml", text).unwrap_or_else(|e| panic!("{e}"))
}

fn shipped() -> Policy {
    compile(include_str!("../../conf/policy.toml"))
}

fn allowed(p: &Policy, s: &Subject, a: Action, repo: &str) -> bool {
    p.authorize(s, a, repo, NOW).allowed
}

// --- precedence -------------------------------------------------------------------------

#[test]
fn group_binding_allows_its_roles_actions_on_matching_repositories() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    assert!(allowed(&p, &bob, Action::Push, "team-a/app"));
    assert!(allowed(&p, &bob, Action::Pull, "team-a/app/sub"));
    assert!(!allowed(&p, &bob, Action::Delete, "team-a/app"));
}

#[test]
fn double_star_never_matches_a_longer_sibling_name() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    assert!(!allowed(&p, &bob, Action::Pull, "team-ab/app"));
}

#[test]
fn most_specific_pattern_wins_over_a_broader_allow() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    let d = p.authorize(&bob, Action::Push, "team-a/prod/api", NOW);
    assert!(!d.allowed);
    assert!(
        matches!(d.reason, Reason::NotInRole { ref pattern, .. } if &**pattern == "team-a/prod/**"),
        "{}",
        d.reason
    );
    assert!(allowed(&p, &bob, Action::Pull, "team-a/prod/api"));
}

#[test]
fn deny_beats_allow_at_equal_specificity() {
    let p = compile(
        r#"
        [[bindings]]
        repositories = ["shared/**"]
        groups = ["devs"]
        role = "developer"
        [[bindings]]
        repositories = ["shared/**"]
        users = ["mallory"]
        role = "developer"
        effect = "deny"
        "#,
    );
    let mallory = Subject::user("mallory", &["devs"]);
    let d = p.authorize(&mallory, Action::Push, "shared/x", NOW);
    assert!(!d.allowed);
    assert!(matches!(
        d.reason,
        Reason::Binding {
            effect: Effect::Deny,
            ..
        }
    ));
    assert!(allowed(
        &p,
        &Subject::user("dave", &["devs"]),
        Action::Push,
        "shared/x"
    ));
}

#[test]
fn a_more_specific_allow_beats_a_broader_deny() {
    let p = compile(
        r#"
        [[bindings]]
        repositories = ["**"]
        authenticated = true
        role = "reader"
        effect = "deny"
        [[bindings]]
        repositories = ["open/**"]
        authenticated = true
        role = "reader"
        "#,
    );
    let u = Subject::user("u", &[]);
    assert!(allowed(&p, &u, Action::Pull, "open/x"));
    assert!(!allowed(&p, &u, Action::Pull, "closed/x"));
}

#[test]
fn bindings_at_the_same_specificity_add_up() {
    let p = compile(
        r#"
        [[bindings]]
        repositories = ["x/**"]
        groups = ["readers"]
        role = "reader"
        [[bindings]]
        repositories = ["x/**"]
        groups = ["deleters"]
        role = "maintainer"
        "#,
    );
    let s = Subject::user("s", &["readers", "deleters"]);
    assert!(allowed(&p, &s, Action::Delete, "x/y"));
}

#[test]
fn admin_group_members_may_do_everything() {
    let p = shipped();
    let alice = Subject::user("alice", &["registry-admins"]);
    for a in Action::ALL {
        let d = p.authorize(&alice, a, "anything/at/all", NOW);
        assert!(d.allowed, "{a}");
        assert!(matches!(d.reason, Reason::AdminGroup { .. }));
    }
}

#[test]
fn anything_no_rule_grants_is_denied() {
    let p = shipped();
    let carol = Subject::user("carol", &[]);
    let d = p.authorize(&carol, Action::Pull, "team-b/app", NOW);
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::NoMatchingRule);
}

#[test]
fn anonymous_rules_apply_to_anonymous_and_signed_in_subjects() {
    let p = shipped();
    assert!(allowed(
        &p,
        &Subject::anonymous(),
        Action::Pull,
        "public/base"
    ));
    assert!(!allowed(
        &p,
        &Subject::anonymous(),
        Action::Push,
        "public/base"
    ));
    assert!(!allowed(
        &p,
        &Subject::anonymous(),
        Action::Pull,
        "team-a/app"
    ));
    assert!(allowed(
        &p,
        &Subject::user("carol", &[]),
        Action::Pull,
        "public/base"
    ));
}

#[test]
fn an_explicit_deny_beats_the_anonymous_floor() {
    let p = compile(
        r#"
        [[anonymous]]
        repositories = ["public/**"]
        role = "reader"
        [[bindings]]
        repositories = ["public/**"]
        users = ["banned"]
        role = "reader"
        effect = "deny"
        "#,
    );
    assert!(!allowed(
        &p,
        &Subject::user("banned", &[]),
        Action::Pull,
        "public/x"
    ));
}

#[test]
fn robots_and_ci_identities_are_bound_by_name() {
    let p = shipped();
    assert!(allowed(
        &p,
        &Subject::robot("robot$team-a+ci"),
        Action::Push,
        "team-a/prod/api"
    ));
    assert!(allowed(
        &p,
        &Subject::ci("github:corp/team-a-app", &[]),
        Action::Push,
        "team-a/app"
    ));
    assert!(!allowed(
        &p,
        &Subject::ci("github:corp/other", &[]),
        Action::Push,
        "team-a/app"
    ));
    // A user named like a robot is not the robot.
    assert!(!allowed(
        &p,
        &Subject::user("robot$team-a+ci", &[]),
        Action::Push,
        "team-a/app"
    ));
}

#[test]
fn expired_bindings_no_longer_apply() {
    let p = shipped();
    let carol = Subject::user("carol", &[]);
    assert!(p.authorize(&carol, Action::Pull, "team-a/app", NOW).allowed);
    let after = NOW + 365 * 86_400;
    assert!(
        !p.authorize(&carol, Action::Pull, "team-a/app", after)
            .allowed
    );
}

#[test]
fn catalog_needs_a_role_with_catalog_whatever_the_pattern() {
    let p = shipped();
    assert!(allowed(
        &p,
        &Subject::user("sec", &["security"]),
        Action::Catalog,
        ""
    ));
    assert!(!allowed(
        &p,
        &Subject::user("bob", &["team-a"]),
        Action::Catalog,
        ""
    ));
    assert!(!allowed(&p, &Subject::anonymous(), Action::Catalog, ""));
}

// --- placeholders -----------------------------------------------------------------------

#[test]
fn username_placeholder_gives_each_user_a_personal_namespace() {
    let p = shipped();
    let bob = Subject::user("bob", &[]);
    assert!(allowed(&p, &bob, Action::Delete, "users/bob/tool"));
    assert!(!allowed(&p, &bob, Action::Pull, "users/alice/tool"));
    assert!(!allowed(&p, &bob, Action::Pull, "users/bobby/tool"));
    assert!(!allowed(
        &p,
        &Subject::anonymous(),
        Action::Pull,
        "users/bob/tool"
    ));
}

#[test]
fn username_placeholder_applies_to_robots_and_ci_names_too() {
    let p = shipped();
    let ci = Subject::ci("ci-job", &[]);
    assert!(allowed(&p, &ci, Action::Push, "users/ci-job/cache"));
}

// --- grants -----------------------------------------------------------------------------

fn scopes(list: &[&str]) -> Vec<Scope> {
    list.iter().map(|s| Scope::parse(s).unwrap()).collect()
}

#[test]
fn grant_is_the_intersection_of_request_and_policy() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    let got = p.grant(
        &bob,
        &scopes(&[
            "repository:team-a/prod/api:pull,push",
            "repository:team-a/app:pull,push,delete",
        ]),
        NOW,
    );
    assert_eq!(
        got,
        scopes(&[
            "repository:team-a/prod/api:pull",
            "repository:team-a/app:pull,push"
        ])
    );
}

#[test]
fn grant_drops_scopes_with_nothing_allowed_and_unknown_types() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    let got = p.grant(
        &bob,
        &scopes(&[
            "repository:team-b/x:pull",
            "plugin:x:pull",
            "repository:Bad/Name:pull",
        ]),
        NOW,
    );
    assert!(got.is_empty(), "{got:?}");
}

#[test]
fn catalog_scope_is_granted_only_with_catalog() {
    let p = shipped();
    let req = scopes(&["registry:catalog:*"]);
    assert_eq!(
        p.grant(&Subject::user("a", &["registry-admins"]), &req, NOW),
        req
    );
    assert!(
        p.grant(&Subject::user("b", &["team-a"]), &req, NOW)
            .is_empty()
    );
}

#[test]
fn repeated_scopes_for_one_repository_are_merged() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    let got = p.grant(
        &bob,
        &scopes(&["repository:team-a/x:pull", "repository:team-a/x:push"]),
        NOW,
    );
    assert_eq!(got, scopes(&["repository:team-a/x:pull,push"]));
}

// --- immutability -----------------------------------------------------------------------

#[test]
fn creating_an_immutable_tag_is_allowed_as_create_only() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    assert!(matches!(
        p.check_tag_write(&bob, "team-a/app", "v1.2.3", TagState::Absent, NOW),
        TagChange::CreateOnly(_)
    ));
    assert!(matches!(
        p.check_tag_write(&bob, "team-a/app", "v1.2.3", TagState::Unknown, NOW),
        TagChange::CreateOnly(_)
    ));
}

#[test]
fn overwriting_an_immutable_tag_is_denied() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    let c = p.check_tag_write(&bob, "team-a/app", "v1.2.3", TagState::Present, NOW);
    assert!(
        matches!(c, TagChange::Denied(ImmutableBy { ref pattern, .. }) if pattern == "v*.*.*"),
        "{c:?}"
    );
}

#[test]
fn deleting_an_immutable_tag_or_its_manifest_is_denied() {
    let p = shipped();
    let m = Subject::user("m", &["team-a"]);
    assert!(matches!(
        p.check_tag_delete(&m, "team-a/app", "release-7", NOW),
        TagChange::Denied(_)
    ));
    // A manifest's delete is decided by storage against its tags, with the rules
    // `protection` gives it.
    let rules = p
        .protection(&m, "team-a/app", NOW)
        .unwrap()
        .compile()
        .unwrap();
    assert!(rules.immutable("v2.0.0").is_some() && !rules.may_override);
    assert!(rules.immutable("latest").is_none());
}

#[test]
fn override_immutable_is_allowed_and_flagged() {
    let p = shipped();
    let admin = Subject::user("alice", &["registry-admins"]);
    assert!(matches!(
        p.check_tag_write(&admin, "team-a/app", "v1.2.3", TagState::Present, NOW),
        TagChange::Override(_)
    ));
    assert!(matches!(
        p.check_tag_delete(&admin, "team-a/app", "v1.2.3", NOW),
        TagChange::Override(_)
    ));
}

#[test]
fn mutable_and_excluded_tags_are_not_immutable() {
    let p = shipped();
    let bob = Subject::user("bob", &["team-a"]);
    assert_eq!(
        p.check_tag_write(&bob, "team-a/app", "latest", TagState::Present, NOW),
        TagChange::Allowed
    );
    assert_eq!(
        p.check_tag_write(&bob, "team-a/app", "v1.2.3-rc1", TagState::Present, NOW),
        TagChange::Allowed
    );
    assert!(p.immutable("team-a/app", "release-12").is_some());
    assert!(p.immutable("team-a/app", "release-x").is_none());
}

// --- retention --------------------------------------------------------------------------

fn rec(tag: Option<&str>, days_ago: i64) -> ManifestRecord {
    ManifestRecord {
        tag: tag.map(String::from),
        digest: format!("sha256:{:064x}", days_ago),
        pushed_at: NOW - days_ago * 86_400,
        pulled_at: None,
    }
}

fn retention_policy(rule: &str) -> Policy {
    compile(&format!(
        "[[immutability]]\nrepositories = [\"**\"]\ntags = [\"v*.*.*\"]\n[[retention]]\nrepositories = [\"r/**\"]\n{rule}"
    ))
}

fn deleted(plan: &RetentionPlan) -> Vec<String> {
    plan.delete
        .iter()
        .map(|v| {
            v.record
                .tag
                .clone()
                .unwrap_or_else(|| v.record.digest.clone())
        })
        .collect()
}

#[test]
fn retention_keeps_the_n_most_recent_tags() {
    let p = retention_policy("keep_last = 2");
    let plan = p.retention(
        "r/app",
        &[
            rec(Some("a"), 1),
            rec(Some("b"), 5),
            rec(Some("c"), 3),
            rec(Some("d"), 9),
        ],
        NOW,
    );
    assert_eq!(deleted(&plan), ["b", "d"]);
}

#[test]
fn retention_keeps_tags_younger_than_the_age_limit() {
    let p = retention_policy("keep_days = 4");
    let plan = p.retention("r/app", &[rec(Some("new"), 1), rec(Some("old"), 10)], NOW);
    assert_eq!(deleted(&plan), ["old"]);
    assert!(plan.keep[0].reason.contains("within 4 days"));
}

/// A record pushed `days_ago` and last pulled `pulled_days_ago`.
fn pulled(tag: Option<&str>, days_ago: i64, pulled_days_ago: i64) -> ManifestRecord {
    ManifestRecord {
        pulled_at: Some(NOW - pulled_days_ago * 86_400),
        ..rec(tag, days_ago)
    }
}

#[test]
fn retention_keeps_what_was_pulled_or_pushed_within_keep_pulled_days() {
    let p = retention_policy("keep_pulled_days = 30\nuntagged = \"delete\"");
    assert!(p.retention_counts_pulls("r/app"));
    assert!(!p.retention_counts_pulls("s/app"), "no rule applies");
    assert!(!retention_policy("keep_last = 2").retention_counts_pulls("r/app"));
    let plan = p.retention(
        "r/app",
        &[
            pulled(Some("pulled-lately"), 400, 2),
            pulled(Some("pulled-long-ago"), 400, 31),
            rec(Some("pushed-lately"), 3),
            rec(Some("never-pulled"), 90),
            // A pull time before the push (a digest pushed again): the push counts.
            pulled(Some("pushed-again"), 5, 60),
            pulled(None, 300, 1),
            pulled(None, 301, 45),
            // Immutable: kept however old.
            pulled(Some("v1.0.0"), 900, 800),
        ],
        NOW,
    );
    assert_eq!(
        deleted(&plan),
        ["never-pulled", "pulled-long-ago", &rec(None, 301).digest]
    );
    let why = |tag: &str| {
        plan.keep
            .iter()
            .chain(&plan.delete)
            .find(|v| v.record.tag.as_deref() == Some(tag))
            .map(|v| v.reason.clone())
            .unwrap_or_default()
    };
    assert_eq!(why("pulled-lately"), "pulled within 30 days");
    assert_eq!(
        why("pushed-lately"),
        "not pulled, but pushed within 30 days"
    );
    assert_eq!(why("pushed-again"), "not pulled, but pushed within 30 days");
    assert_eq!(
        why("never-pulled"),
        "neither pulled nor pushed within 30 days"
    );
    assert!(
        plan.keep
            .iter()
            .any(|v| v.record.tag.is_none() && v.reason == "untagged, but pulled within 30 days"),
        "{plan:?}"
    );
}

#[test]
fn retention_keeps_a_tag_if_any_keep_rule_holds() {
    let p = retention_policy("keep_last = 1\nkeep_days = 4");
    let plan = p.retention(
        "r/app",
        &[rec(Some("a"), 1), rec(Some("b"), 2), rec(Some("c"), 10)],
        NOW,
    );
    assert_eq!(deleted(&plan), ["c"]);
}

#[test]
fn retention_always_keeps_tags_matching_keep_patterns() {
    let p = retention_policy("keep_last = 1\nkeep_tags = [\"stable\"]");
    let plan = p.retention(
        "r/app",
        &[
            rec(Some("new"), 1),
            rec(Some("stable"), 100),
            rec(Some("old"), 50),
        ],
        NOW,
    );
    assert_eq!(deleted(&plan), ["old"]);
}

#[test]
fn retention_never_selects_immutable_tags() {
    let p = retention_policy("keep_last = 1");
    let plan = p.retention(
        "r/app",
        &[
            rec(Some("new"), 1),
            rec(Some("v1.0.0"), 400),
            rec(Some("old"), 50),
        ],
        NOW,
    );
    assert_eq!(deleted(&plan), ["old"]);
    assert!(plan.keep.iter().any(|v| v.reason.starts_with("immutable")));
}

#[test]
fn retention_deletes_untagged_manifests_only_when_asked_and_after_the_grace() {
    let keep = retention_policy("keep_last = 5");
    assert!(
        keep.retention("r/app", &[rec(None, 100)], NOW)
            .delete
            .is_empty()
    );
    let p = retention_policy("keep_days = 7\nuntagged = \"delete\"");
    let plan = p.retention("r/app", &[rec(None, 100), rec(None, 2)], NOW);
    assert_eq!(plan.delete.len(), 1);
    assert_eq!(plan.delete[0].record.pushed_at, NOW - 100 * 86_400);
}

#[test]
fn retention_keeps_everything_where_no_rule_applies() {
    let p = retention_policy("keep_last = 1");
    let plan = p.retention("other/app", &[rec(Some("a"), 1), rec(Some("b"), 500)], NOW);
    assert!(plan.delete.is_empty() && plan.rule_line.is_none());
}

#[test]
fn the_most_specific_retention_rule_applies() {
    let p = compile(
        "[[retention]]\nrepositories = [\"r/**\"]\nkeep_last = 1\n[[retention]]\nrepositories = [\"r/keep/**\"]\nkeep_last = 10\n",
    );
    let recs = [rec(Some("a"), 1), rec(Some("b"), 2)];
    assert_eq!(deleted(&p.retention("r/app", &recs, NOW)), ["b"]);
    assert!(p.retention("r/keep/app", &recs, NOW).delete.is_empty());
}

// --- invalid configurations: one per kind, each naming file:line and field --------------

fn error(text: &str) -> PolicyError {
    Policy::compile("bad.toml", text).expect_err("should not compile")
}

#[test]
fn invalid_configs_are_rejected_with_file_line_and_field() {
    let cases: &[(&str, &str, usize, &str, &str)] = &[
        ("syntax error", "[[bindings]\n", 1, "syntax", ""),
        (
            "unknown key",
            "admin_groups = []\n[[bindings]]\nrepositories = [\"a\"]\ngroups = [\"g\"]\nrole = \"reader\"\nrol = \"x\"\n",
            6,
            "syntax",
            "unknown field",
        ),
        (
            "unknown role",
            "\n[[bindings]]\nrepositories = [\"a/**\"]\ngroups = [\"g\"]\nrole = \"devloper\"\n",
            5,
            "bindings[0].role",
            "unknown role \"devloper\"",
        ),
        (
            "bad glob",
            "[[bindings]]\nrepositories = [\"a/**x\"]\ngroups = [\"g\"]\nrole = \"reader\"\n",
            2,
            "bindings[0].repositories",
            "'**' must be a whole segment",
        ),
        (
            "uppercase pattern",
            "[[bindings]]\nrepositories = [\"Team/**\"]\ngroups = [\"g\"]\nrole = \"reader\"\n",
            2,
            "bindings[0].repositories",
            "not allowed",
        ),
        (
            "unknown placeholder",
            "[[bindings]]\nrepositories = [\"u/{user}\"]\nauthenticated = true\nrole = \"reader\"\n",
            2,
            "bindings[0].repositories",
            "unknown placeholder",
        ),
        (
            "bad regex",
            "[[immutability]]\nrepositories = [\"**\"]\ntag_regexes = ['v(']\n",
            3,
            "immutability[0].tag_regexes",
            "invalid regular expression",
        ),
        (
            "bad tag glob",
            "[[immutability]]\nrepositories = [\"**\"]\ntags = [\"a/b\"]\n",
            3,
            "immutability[0].tags",
            "not allowed in a tag pattern",
        ),
        (
            "duplicate binding",
            "[[bindings]]\nrepositories = [\"a/**\"]\ngroups = [\"g\"]\nrole = \"reader\"\n[[bindings]]\nrepositories = [\"a/**\"]\ngroups = [\"g\"]\nrole = \"reader\"\n",
            6,
            "bindings[1]",
            "duplicates the binding at line 1",
        ),
        (
            "contradictory binding",
            "[[bindings]]\nrepositories = [\"a/**\"]\nusers = [\"u\"]\nrole = \"developer\"\n[[bindings]]\nrepositories = [\"a/**\"]\nusers = [\"u\"]\nrole = \"reader\"\neffect = \"deny\"\n",
            6,
            "bindings[1]",
            "contradicts the binding at line 1",
        ),
        (
            "unknown action",
            "[roles.x]\nactions = [\"pull\", \"pus\"]\n",
            2,
            "roles.x.actions",
            "unknown action \"pus\"",
        ),
        (
            "redefined builtin role",
            "[roles.admin]\nactions = [\"pull\"]\n",
            1,
            "roles.admin",
            "built-in",
        ),
        (
            "binding for nobody",
            "[[bindings]]\nrepositories = [\"a\"]\nrole = \"reader\"\n",
            1,
            "bindings[0]",
            "applies to nobody",
        ),
        (
            "retention that keeps everything",
            "[[retention]]\nrepositories = [\"a\"]\n",
            1,
            "retention[0]",
            "keeps everything",
        ),
        (
            "retention kept by no pull",
            "[[retention]]\nrepositories = [\"a\"]\nkeep_pulled_days = 0\n",
            1,
            "retention[0]",
            "keep_pulled_days = 0",
        ),
        (
            "retention over a century",
            "[[retention]]\nrepositories = [\"a\"]\nkeep_days = 99999999999999\n",
            1,
            "retention[0]",
            "keep_days is over 36500 days",
        ),
        (
            "immutability without tags",
            "[[immutability]]\nrepositories = [\"a\"]\n",
            1,
            "immutability[0]",
            "needs tags",
        ),
        (
            "bad effect",
            "[[bindings]]\nrepositories = [\"a\"]\ngroups = [\"g\"]\nrole = \"reader\"\neffect = \"maybe\"\n",
            5,
            "syntax",
            "unknown variant",
        ),
    ];
    for (what, text, line, field, msg) in cases {
        let e = error(text);
        assert_eq!(
            (e.file.as_str(), e.line, e.field.as_str()),
            ("bad.toml", *line, *field),
            "{what}: {e}"
        );
        assert!(e.message.contains(msg), "{what}: {e}");
        assert!(
            e.to_string().starts_with(&format!("bad.toml:{line}: ")),
            "{what}: {e}"
        );
    }
}

#[test]
fn the_shipped_policy_compiles() {
    let p = shipped();
    assert!(p.binding_count() >= 6);
}

// --- properties -------------------------------------------------------------------------

mod properties {
    use super::*;
    use proptest::prelude::*;

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("team-a".to_string()),
            Just("team-ab".to_string()),
            Just("prod".to_string()),
            "[a-z]{1,3}"
        ]
    }

    fn repo() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 1..4).prop_map(|v| v.join("/"))
    }

    fn action() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("pull"),
            Just("push"),
            Just("delete"),
            Just("*"),
            Just("bogus")
        ]
    }

    fn scope() -> impl Strategy<Value = Scope> {
        (repo(), proptest::collection::vec(action(), 0..4)).prop_map(|(name, acts)| Scope {
            resource_type: "repository".into(),
            name,
            actions: acts.into_iter().map(String::from).collect(),
        })
    }

    fn subject() -> impl Strategy<Value = Subject> {
        (
            prop_oneof![Just("bob"), Just("carol"), Just("alice")],
            proptest::collection::vec(
                prop_oneof![Just("team-a"), Just("security"), Just("x")],
                0..3,
            ),
        )
            .prop_map(|(n, g)| Subject::user(n, &g))
    }

    proptest! {
        #[test]
        fn granted_scopes_are_within_the_request_and_the_rules(s in subject(), req in proptest::collection::vec(scope(), 0..5)) {
            let p = shipped();
            for g in p.grant(&s, &req, NOW) {
                let asked: Vec<&String> = req.iter().filter(|r| r.name == g.name).flat_map(|r| &r.actions).collect();
                for a in &g.actions {
                    prop_assert!(asked.contains(&a), "granted {a} on {} that was not requested", g.name);
                    let needed: &[Action] = match a.as_str() {
                        "pull" => &[Action::Pull],
                        "push" => &[Action::Push],
                        "delete" => &[Action::Delete],
                        "*" => &[Action::Pull, Action::Push, Action::Delete],
                        other => { prop_assert!(false, "unknown action {other} granted"); &[] }
                    };
                    for n in needed {
                        prop_assert!(p.authorize(&s, *n, &g.name, NOW).allowed);
                    }
                }
            }
        }

        #[test]
        fn a_double_star_pattern_matches_only_its_own_subtree(prefix in "[a-z]{1,6}", extra in "[a-z0-9-]{1,4}", rest in proptest::collection::vec("[a-z]{1,3}", 0..3)) {
            let pat = pattern::RepoPattern::compile(&format!("{prefix}/**")).unwrap();
            let sibling = std::iter::once(format!("{prefix}{extra}")).chain(rest.iter().cloned()).collect::<Vec<_>>().join("/");
            prop_assert!(!pat.matches(&sibling, None), "{prefix}/** matched {sibling}");
            let inside = std::iter::once(prefix.clone()).chain(rest.iter().cloned()).collect::<Vec<_>>().join("/");
            prop_assert!(pat.matches(&inside, None), "{prefix}/** did not match {inside}");
        }
    }
}

#[test]
fn the_protection_sent_to_storage_says_what_the_policy_says_of_every_tag() {
    let p = shipped();
    let bob = Subject {
        name: "bob".into(),
        kind: SubjectKind::User,
        groups: vec!["team-a".into()],
    };
    let wire = p
        .protection(&bob, "team-a/app", 0)
        .expect("rules cover team-a/app");
    assert!(!wire.may_override);
    let json = serde_json::to_string(&wire).unwrap();
    let back: crate::immutability::Protection = serde_json::from_str(&json).unwrap();
    assert_eq!(back, wire);
    let compiled = back.compile().unwrap();
    for tag in [
        "v1.2.3",
        "v1.2.3-rc1",
        "release-12",
        "release-x",
        "latest",
        "v1",
        "V1.2.3",
    ] {
        assert_eq!(
            compiled.immutable(tag),
            p.immutable("team-a/app", tag),
            "{tag}"
        );
    }
    let admin = Subject {
        name: "alice".into(),
        kind: SubjectKind::User,
        groups: vec!["registry-admins".into()],
    };
    assert!(p.protection(&admin, "team-a/app", 0).unwrap().may_override);
    assert!(compile("").protection(&bob, "team-a/app", 0).is_none());
}
