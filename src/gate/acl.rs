//! Topic access control: who may publish to which topics and subscribe to which filters.
//!
//! Rules come from the config (`[[acl]]`), each for one `user`, one `group` (from `[groups]`)
//! or `user = "*"` (every client), with `publish` and `subscribe` topic filters in which `%u`
//! stands for the user name and `%c` for the client id, as in Mosquitto's ACL files. A rule with
//! `%u` never matches an anonymous client, and one with `%c` never matches a client id holding
//! `/`, `+` or `#`, so that substitution cannot widen a rule.
//!
//! A rule's `deny` filters win over every rule's allows: a publish to a topic a deny filter
//! matches is refused, and so is a subscription whose filter can match any topic a deny filter
//! matches (the relay does not withhold single messages from a granted subscription, so a
//! subscription that could receive a denied topic is refused whole). A deny filter whose `%u`
//! or `%c` cannot be filled in stands for every value there (`+`): a deny never narrows.
//!
//! When access control is on (users exist, or rules are configured), anything no rule allows is
//! denied; when it is off, everything is allowed.

use std::collections::HashMap;

use crate::config::AclRule;

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    pub user: Option<&'a str>,
    pub client_id: &'a str,
}

#[derive(Debug, Clone, Default)]
pub struct Acl {
    rules: Vec<AclRule>,
    groups: HashMap<String, Vec<String>>,
    enforced: bool,
}

impl Acl {
    pub fn new(
        rules: Vec<AclRule>,
        groups: HashMap<String, Vec<String>>,
        users_exist: bool,
    ) -> Acl {
        let enforced = users_exist || !rules.is_empty();
        Acl {
            rules,
            groups,
            enforced,
        }
    }

    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// May `who` publish to `topic`?
    pub fn may_publish(&self, who: Who<'_>, topic: &str) -> bool {
        !self.enforced
            || (!self.denied(who, |deny| topic_matches(deny, topic))
                && self.applicable(who).any(|r| {
                    r.publish
                        .iter()
                        .filter_map(|f| substitute(f, who))
                        .any(|f| topic_matches(&f, topic))
                }))
    }

    /// Whether a deny filter of a rule that applies to `who` is `hit`.
    fn denied(&self, who: Who<'_>, hit: impl Fn(&str) -> bool) -> bool {
        self.applicable(who)
            .flat_map(|r| r.deny.iter())
            .any(|f| hit(&substitute_wide(f, who)))
    }

    /// May `who` subscribe to `filter`? Only if every topic the filter can match is allowed.
    pub fn may_subscribe(&self, who: Who<'_>, filter: &str) -> bool {
        if !self.enforced {
            return true;
        }
        // A shared subscription `$share/<group>/<filter>` is judged by its filter.
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_, f)) => f,
                None => return false,
            },
            None => filter,
        };
        !self.denied(who, |deny| overlaps(deny, filter))
            && self.applicable(who).any(|r| {
                r.subscribe
                    .iter()
                    .filter_map(|f| substitute(f, who))
                    .any(|allowed| covers(&allowed, filter))
            })
    }

    fn applicable<'s>(&'s self, who: Who<'s>) -> impl Iterator<Item = &'s AclRule> + 's {
        self.rules
            .iter()
            .filter(move |r| match (&r.user, &r.group) {
                (Some(u), _) if u == "*" => true,
                (Some(u), _) => who.user == Some(u.as_str()),
                (None, Some(g)) => match (who.user, self.groups.get(g)) {
                    (Some(user), Some(members)) => members.iter().any(|m| m == user),
                    _ => false,
                },
                (None, None) => false,
            })
    }
}

/// The filter with `%u` and `%c` put in; `None` when they cannot be.
fn substitute(filter: &str, who: Who<'_>) -> Option<String> {
    let unsafe_part = |s: &str| s.is_empty() || s.contains(['/', '+', '#']);
    let mut out = filter.to_owned();
    if out.contains("%u") {
        let user = who.user.filter(|u| !unsafe_part(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if unsafe_part(who.client_id) {
            return None;
        }
        out = out.replace("%c", who.client_id);
    }
    Some(out)
}

/// A deny filter with `%u` and `%c` put in; a level where one cannot be (an anonymous client,
/// a client id holding `/`, `+` or `#`) becomes `+`, so the deny covers every value there.
fn substitute_wide(filter: &str, who: Who<'_>) -> String {
    filter
        .split('/')
        .map(|level| {
            if !level.contains("%u") && !level.contains("%c") {
                return level.to_owned();
            }
            substitute(level, who).unwrap_or_else(|| "+".to_owned())
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Whether some topic matches both filters (`$` topics only by filters that name them).
fn overlaps(a: &str, b: &str) -> bool {
    let wild_first = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (a.starts_with('$') && wild_first(b)) || (b.starts_with('$') && wild_first(a)) {
        return false;
    }
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) => {
                if x != "+" && y != "+" && x != y {
                    return false;
                }
            }
        }
    }
}

/// MQTT matching of a concrete topic against a filter.
fn topic_matches(filter: &str, topic: &str) -> bool {
    covers(filter, topic)
}

/// Whether every topic matched by `requested` (a filter or a topic) is matched by `allowed`.
fn covers(allowed: &str, requested: &str) -> bool {
    if requested.starts_with('$') && (allowed.starts_with('+') || allowed.starts_with('#')) {
        return false;
    }
    let mut req = requested.split('/');
    for a in allowed.split('/') {
        match a {
            "#" => return true,
            "+" => match req.next() {
                Some("#") | None => return false,
                Some(_) => {}
            },
            level => {
                if req.next() != Some(level) {
                    return false;
                }
            }
        }
    }
    req.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        user: Option<&str>,
        group: Option<&str>,
        publish: &[&str],
        subscribe: &[&str],
    ) -> AclRule {
        AclRule {
            user: user.map(str::to_owned),
            group: group.map(str::to_owned),
            publish: publish.iter().map(|s| s.to_string()).collect(),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            deny: Vec::new(),
        }
    }

    #[test]
    fn deny_wins_over_allows_for_topics_and_overlapping_filters() {
        let mut home = rule(Some("*"), None, &["home/#"], &["home/#", "+/lights"]);
        home.deny = vec!["home/safe/#".into(), "home/%u/diary".into()];
        let acl = Acl::new(
            vec![home, rule(Some("admin"), None, &["#"], &["#"])],
            HashMap::new(),
            true,
        );
        let cases: &[(Option<&str>, &str, bool, bool)] = &[
            // user, topic/filter, may publish, may subscribe
            (Some("ann"), "home/lights", true, true),
            (Some("ann"), "home/safe", false, false),
            (Some("ann"), "home/safe/code", false, false),
            (Some("ann"), "home/ann/diary", false, false),
            (Some("ann"), "home/bob/diary", true, true),
            // Filters that could receive a denied topic are refused whole.
            (Some("ann"), "home/#", false, false),
            (Some("ann"), "home/+/code", false, false),
            (Some("ann"), "home/+/diary", false, false),
            (Some("ann"), "+/lights", false, true),
            // A deny in a rule for everyone binds the admin too.
            (Some("admin"), "home/safe/code", false, false),
            (Some("admin"), "office/x", true, true),
            // Anonymous: `%u` cannot be filled in, so the deny covers every user's diary.
            (None, "home/bob/diary", false, false),
            (None, "home/bob/notes", true, true),
        ];
        let cases: Vec<_> = cases
            .iter()
            .map(|&(user, t, publish, subscribe)| (user, "c", t, publish, subscribe))
            .collect();
        check(&acl, &cases);
    }

    #[test]
    fn filters_overlap_as_mqtt_matching_says() {
        let cases = [
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "+/b/+", true),
            ("a/b", "a/c", false),
            ("#", "$SYS/x", false),
            ("$SYS/#", "$SYS/+", true),
            ("+/x", "$SYS/x", false),
            ("a", "a/+", false),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlaps(a, b), want, "{a} ~ {b}");
            assert_eq!(overlaps(b, a), want, "{b} ~ {a}");
        }
    }

    fn who<'a>(user: Option<&'a str>, client_id: &'a str) -> Who<'a> {
        Who { user, client_id }
    }

    /// Each case: user, client id, topic or filter, may publish (topics only), may subscribe.
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, bool, bool);

    fn check(acl: &Acl, cases: &[Case<'_>]) {
        for &(user, client, t, publish, subscribe) in cases {
            let w = who(user, client);
            if !t.contains(['+', '#']) {
                assert_eq!(acl.may_publish(w, t), publish, "publish {user:?} {t}");
            }
            assert_eq!(acl.may_subscribe(w, t), subscribe, "subscribe {user:?} {t}");
        }
    }

    #[test]
    fn nothing_is_checked_without_users_or_rules() {
        let acl = Acl::new(vec![], HashMap::new(), false);
        assert!(acl.may_publish(who(None, "c"), "any/thing"));
        assert!(acl.may_subscribe(who(None, "c"), "#"));
    }

    #[test]
    fn default_deny_once_users_exist() {
        let acl = Acl::new(vec![], HashMap::new(), true);
        assert!(!acl.may_publish(who(Some("alice"), "c"), "a"));
        assert!(!acl.may_subscribe(who(Some("alice"), "c"), "a"));
    }

    #[test]
    fn rules_by_user_group_and_substitution() {
        let groups = HashMap::from([("meters".to_owned(), vec!["m1".to_owned(), "m2".to_owned()])]);
        let acl = Acl::new(
            vec![
                rule(Some("alice"), None, &["chat/#"], &["chat/#"]),
                rule(None, Some("meters"), &["meters/%u/#"], &["cmd/%u"]),
                rule(Some("*"), None, &["clients/%c/status"], &["public/+"]),
            ],
            groups,
            true,
        );
        let cases: &[Case<'_>] = &[
            // user, client, topic/filter, may publish, may subscribe
            (Some("alice"), "a1", "chat/room", true, true),
            (Some("alice"), "a1", "chat/#", false, true),
            (Some("alice"), "a1", "meters/m1/x", false, false),
            (Some("m1"), "x", "meters/m1/kwh", true, false),
            (Some("m1"), "x", "meters/m2/kwh", false, false),
            (Some("m2"), "x", "cmd/m2", false, true),
            (Some("m2"), "x", "cmd/m1", false, false),
            (Some("m2"), "x", "cmd/+", false, false),
            (Some("bob"), "dev7", "clients/dev7/status", true, false),
            (None, "dev7", "clients/dev7/status", true, false),
            (None, "dev/7", "clients/dev/7/status", false, false),
            (None, "dev+", "clients/dev+/status", false, false),
            (Some("bob"), "x", "public/news", false, true),
            (Some("bob"), "x", "public/#", false, false),
            (Some("bob"), "x", "$share/g/public/news", false, true),
            (Some("bob"), "x", "$share/g/secret", false, false),
        ];
        check(&acl, cases);
    }

    #[test]
    fn user_substitution_never_widens() {
        let acl = Acl::new(
            vec![rule(Some("*"), None, &["home/%u/#"], &["home/%u/#"])],
            HashMap::new(),
            true,
        );
        assert!(!acl.may_publish(who(Some("#"), "c"), "home/x/y"));
        assert!(!acl.may_subscribe(who(Some("+"), "c"), "home/+/#"));
        assert!(!acl.may_publish(who(None, "c"), "home//y"));
    }

    #[test]
    fn wildcard_rules_do_not_cover_dollar_topics() {
        let acl = Acl::new(
            vec![rule(Some("*"), None, &["#"], &["#"])],
            HashMap::new(),
            true,
        );
        assert!(acl.may_subscribe(who(None, "c"), "a/#"));
        assert!(!acl.may_subscribe(who(None, "c"), "$SYS/#"));
        assert!(!acl.may_publish(who(None, "c"), "$SYS/x"));
    }
}
