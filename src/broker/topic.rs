//! Topic names and topic filters as MQTT 3.1.1 and 5.0 define them (sections 4.7 and 4.8.2).
//!
//! This module owns the rules: which strings may be published to ([`check_topic`]), which may be
//! subscribed to ([`Filter::parse`], including `$share/<group>/<filter>`), and whether a filter
//! matches a topic ([`matches`]) or two filters can match a common topic ([`overlaps`]).
//!
//! What it promises:
//! - Levels are separated by `/`; empty levels are ordinary levels (`a//b`, `/a`, `a/`).
//! - `+` matches exactly one level (an empty one too); `#` matches its parent level and any
//!   number of levels below it (`a/#` matches `a`, `a/`, `a/b/c`).
//! - A filter whose first character is `+` or `#` never matches a topic whose first character
//!   is `$` [MQTT-4.7.2-1]; apart from that, `$` topics are ordinary topics.
//! - Any UTF-8 is allowed except U+0000; lengths are counted in bytes (at most 65,535).
//! - Pure functions: no I/O, no allocation except for the [`Filter`] a parse returns.
//!
//! The subscription tree ([`super::tree`]) and the retained store ([`super::retained`]) match
//! exactly as [`matches`] does; the tests of those modules check them against it.

use std::fmt;
use std::sync::Arc;

/// The most bytes a topic name or filter may have (it is sent as a two-byte-length string).
pub const MAX_LEN: usize = 65_535;

/// The prefix of a shared subscription's filter (MQTT 5.0 section 4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// Why a topic name cannot be published to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("a topic name may not be empty")]
    Empty,
    #[error("a topic name may not hold '+' or '#'")]
    Wildcard,
    #[error("a topic name may not hold U+0000")]
    Null,
    #[error("a topic name may be at most 65,535 bytes")]
    TooLong,
}

/// Checks that `name` may be published to: not empty, at most [`MAX_LEN`] bytes, no U+0000, no
/// wildcard character. The first failing rule in that order is the one reported.
pub fn check_topic(name: &str) -> Result<(), TopicError> {
    if name.is_empty() {
        Err(TopicError::Empty)
    } else if name.len() > MAX_LEN {
        Err(TopicError::TooLong)
    } else if name.contains('\0') {
        Err(TopicError::Null)
    } else if name.contains(['+', '#']) {
        Err(TopicError::Wildcard)
    } else {
        Ok(())
    }
}

/// Why a topic filter cannot be subscribed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("a topic filter may not be empty")]
    Empty,
    #[error(
        "a topic filter may hold '#' only as its whole last level and '+' only as a whole level"
    )]
    MisplacedWildcard,
    #[error("a topic filter may not hold U+0000")]
    Null,
    #[error("a topic filter may be at most 65,535 bytes")]
    TooLong,
    #[error(
        "a shared subscription must read '$share/<group>/<filter>' with a non-empty group \
         free of '+' and '#' and a non-empty filter"
    )]
    SharedMalformed,
}

/// A checked filter. For `$share/<group>/<filter>`: group = Some(group), filter = the part after
/// the group.
///
/// Build it with [`Filter::parse`]; the tree and the retained store rely on `filter` being a
/// valid plain filter (a hand-built invalid one matches as if its misplaced wildcard characters
/// were literal, which no valid topic holds, or as the leading valid part; it never panics).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Filter {
    pub group: Option<Arc<str>>,
    pub filter: Arc<str>,
}

impl Filter {
    /// Checks `s` and splits a shared subscription into its group and filter.
    ///
    /// The rules, in the order they are checked: not empty, at most [`MAX_LEN`] bytes (the whole
    /// string, `$share/<group>/` included), no U+0000, then for `$share/...` a group and a filter
    /// that are both present and non-empty with no `+` or `#` in the group, then the wildcard
    /// placement of the filter. A bare `$share` (no `/`) is an ordinary filter.
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        if s.is_empty() {
            return Err(FilterError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(FilterError::TooLong);
        }
        if s.contains('\0') {
            return Err(FilterError::Null);
        }
        let (group, filter) = match s.strip_prefix(SHARE_PREFIX) {
            Some(rest) => {
                let Some((group, filter)) = rest.split_once('/') else {
                    return Err(FilterError::SharedMalformed);
                };
                if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                    return Err(FilterError::SharedMalformed);
                }
                (Some(Arc::from(group)), filter)
            }
            None => (None, s),
        };
        check_wildcards(filter)?;
        Ok(Filter {
            group,
            filter: Arc::from(filter),
        })
    }

    /// The filter as the client wrote it: `$share/<group>/<filter>` or `<filter>`.
    pub fn full(&self) -> String {
        self.to_string()
    }

    /// Whether the filter (the part after any `$share/<group>/`) holds `+` or `#`.
    pub fn has_wildcard(&self) -> bool {
        self.filter.contains(['+', '#'])
    }
}

impl fmt::Display for Filter {
    /// Writes what [`Filter::full`] returns.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(group) => write!(f, "{SHARE_PREFIX}{group}/{}", self.filter),
            None => f.write_str(&self.filter),
        }
    }
}

/// `#` only as the whole last level, `+` only as a whole level.
fn check_wildcards(filter: &str) -> Result<(), FilterError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let hash_ok = !level.contains('#') || (level == "#" && levels.peek().is_none());
        let plus_ok = !level.contains('+') || level == "+";
        if !hash_ok || !plus_ok {
            return Err(FilterError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Whether [MQTT-4.7.2-1] lets `filter` match `topic` (or any topic that `topic`, a filter
/// with a literal first level, matches).
fn dollar_rule_allows(filter: &str, topic: &str) -> bool {
    !(topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')))
}

/// Whether `filter` (not a shared one; already checked) matches `topic`, with the `$` rule: a
/// filter starting with '+' or '#' never matches a topic starting with '$' [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if !dollar_rule_allows(filter, topic) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            // '#' is last in a checked filter, and matches the parent level too.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) => {
                if fl != tl {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

/// Whether two filters (plain, already checked) can both match some topic, with the `$` rule.
/// Symmetric. The ACL uses it to refuse subscriptions that overlap a denied filter.
pub fn overlaps(a: &str, b: &str) -> bool {
    if !dollar_rule_allows(a, b) || !dollar_rule_allows(b, a) {
        return false;
    }
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(x), Some(y)) => {
                if x != "+" && y != "+" && x != y {
                    return false;
                }
            }
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
        }
    }
}

/// Also used by the tests of the tree and the retained store.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        let long_ok = "a".repeat(MAX_LEN);
        let too_long = "a".repeat(MAX_LEN + 1);
        // 'é' is two bytes: 32,768 of them are 65,536 bytes but only 32,768 characters.
        let long_utf8 = "é".repeat(32_768);
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("a/b/c", Ok(())),
            ("/", Ok(())),
            ("//", Ok(())),
            ("/a", Ok(())),
            ("a/", Ok(())),
            ("a//b", Ok(())),
            ("$SYS/broker", Ok(())),
            ("$", Ok(())),
            ("ü/x", Ok(())),
            ("温度/房间", Ok(())),
            (" ", Ok(())),
            ("a b/c\td", Ok(())),
            (&long_ok, Ok(())),
            ("", Err(TopicError::Empty)),
            (&too_long, Err(TopicError::TooLong)),
            (&long_utf8, Err(TopicError::TooLong)),
            ("a\0b", Err(TopicError::Null)),
            ("\0", Err(TopicError::Null)),
            ("+", Err(TopicError::Wildcard)),
            ("#", Err(TopicError::Wildcard)),
            ("a/+/b", Err(TopicError::Wildcard)),
            ("a/#", Err(TopicError::Wildcard)),
            ("a+b", Err(TopicError::Wildcard)),
            ("a#", Err(TopicError::Wildcard)),
            ("$share/g/a", Ok(())),
        ];
        for (name, want) in cases {
            let shown: String = name.chars().take(20).collect();
            assert_eq!(check_topic(name), *want, "{shown:?}");
        }
    }

    #[test]
    fn filters() {
        let long_ok = "a".repeat(MAX_LEN);
        let too_long = "a".repeat(MAX_LEN + 1);
        // "$share/g/" is 9 bytes; the limit counts them.
        let shared_long_ok = format!("$share/g/{}", "a".repeat(MAX_LEN - 9));
        let shared_too_long = format!("$share/g/{}", "a".repeat(MAX_LEN - 8));
        use FilterError::*;
        // Ok((group, filter)) or the error.
        type Want<'a> = Result<(Option<&'a str>, &'a str), FilterError>;
        let cases: &[(&str, Want<'_>)] = &[
            ("a", Ok((None, "a"))),
            ("a/b", Ok((None, "a/b"))),
            ("#", Ok((None, "#"))),
            ("+", Ok((None, "+"))),
            ("+/+", Ok((None, "+/+"))),
            ("a/#", Ok((None, "a/#"))),
            ("a/+/b/#", Ok((None, "a/+/b/#"))),
            ("/#", Ok((None, "/#"))),
            ("+/", Ok((None, "+/"))),
            ("/", Ok((None, "/"))),
            ("a//b", Ok((None, "a//b"))),
            ("$SYS/#", Ok((None, "$SYS/#"))),
            ("ü/+/温度", Ok((None, "ü/+/温度"))),
            ("$share", Ok((None, "$share"))),
            ("$shared/g/a", Ok((None, "$shared/g/a"))),
            ("$SHARE/g/a", Ok((None, "$SHARE/g/a"))),
            ("$share/g/a", Ok((Some("g"), "a"))),
            ("$share/g/#", Ok((Some("g"), "#"))),
            ("$share/g/+/x", Ok((Some("g"), "+/x"))),
            ("$share/g/$SYS/x", Ok((Some("g"), "$SYS/x"))),
            ("$share/g$/a/", Ok((Some("g$"), "a/"))),
            ("$share/grüppe/a//b", Ok((Some("grüppe"), "a//b"))),
            ("$share/g//", Ok((Some("g"), "/"))),
            ("$share/g/$share/h/x", Ok((Some("g"), "$share/h/x"))),
            (&long_ok, Ok((None, &long_ok))),
            (&shared_long_ok, Ok((Some("g"), &shared_long_ok[9..]))),
            ("", Err(Empty)),
            (&too_long, Err(TooLong)),
            (&shared_too_long, Err(TooLong)),
            ("a\0", Err(Null)),
            ("$share/g\0/a", Err(Null)),
            ("a#", Err(MisplacedWildcard)),
            ("#/a", Err(MisplacedWildcard)),
            ("a/#/b", Err(MisplacedWildcard)),
            ("a/#/", Err(MisplacedWildcard)),
            ("##", Err(MisplacedWildcard)),
            ("a+", Err(MisplacedWildcard)),
            ("+a/b", Err(MisplacedWildcard)),
            ("a/++", Err(MisplacedWildcard)),
            ("a/+#", Err(MisplacedWildcard)),
            ("$share/g/a+", Err(MisplacedWildcard)),
            ("$share/g/#/a", Err(MisplacedWildcard)),
            ("$share/", Err(SharedMalformed)),
            ("$share/g", Err(SharedMalformed)),
            ("$share/g/", Err(SharedMalformed)),
            ("$share//x", Err(SharedMalformed)),
            ("$share//", Err(SharedMalformed)),
            ("$share/+/x", Err(SharedMalformed)),
            ("$share/#/x", Err(SharedMalformed)),
            ("$share/g+/x", Err(SharedMalformed)),
            ("$share/a#b/x", Err(SharedMalformed)),
        ];
        for (input, want) in cases {
            let shown: String = input.chars().take(24).collect();
            let got = Filter::parse(input);
            match want {
                Ok((group, filter)) => {
                    let f = got.unwrap_or_else(|e| panic!("{shown:?}: {e}"));
                    assert_eq!(f.group.as_deref(), *group, "{shown:?}");
                    assert_eq!(&*f.filter, *filter, "{shown:?}");
                    assert_eq!(f.full(), *input, "{shown:?}");
                    assert_eq!(f.has_wildcard(), filter.contains(['+', '#']), "{shown:?}");
                }
                Err(e) => assert_eq!(got, Err(*e), "{shown:?}"),
            }
        }
    }

    #[test]
    fn has_wildcard_looks_at_the_filter_only() {
        let cases = [
            ("a/b", false),
            ("a/+", true),
            ("#", true),
            ("$share/g/a", false),
            ("$share/g/a/#", true),
        ];
        for (input, want) in cases {
            assert_eq!(
                Filter::parse(input).map(|f| f.has_wildcard()),
                Ok(want),
                "{input}"
            );
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            TopicError::Wildcard.to_string(),
            "a topic name may not hold '+' or '#'"
        );
        for e in [
            FilterError::Empty,
            FilterError::MisplacedWildcard,
            FilterError::Null,
            FilterError::TooLong,
            FilterError::SharedMalformed,
        ] {
            assert!(e.to_string().starts_with("a "), "{e}");
        }
    }

    /// (filter, topic, matches)
    pub(crate) const MATCH_CASES: &[(&str, &str, bool)] = &[
        ("a", "a", true),
        ("a", "b", false),
        ("a", "a/b", false),
        ("a/b", "a", false),
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("A", "a", false),
        // '+'
        ("+", "a", true),
        ("+", "a/b", false),
        ("+", "/", false),
        ("+/+", "/", true),
        ("+/+", "a/", true),
        ("+/+", "/b", true),
        ("a/+", "a/b", true),
        ("a/+", "a/", true),
        ("a/+", "a", false),
        ("a/+", "a/b/c", false),
        ("a/+/c", "a/b/c", true),
        ("a/+/c", "a//c", true),
        ("a/+/c", "a/b/d", false),
        ("+/b", "a/b", true),
        ("+/b", "/b", true),
        // '#'
        ("#", "a", true),
        ("#", "a/b/c", true),
        ("#", "/", true),
        ("#", "/a", true),
        ("a/#", "a", true),
        ("a/#", "a/", true),
        ("a/#", "a/b", true),
        ("a/#", "a/b/c", true),
        ("a/#", "b", false),
        ("a/#", "ab", false),
        ("a/#", "b/a", false),
        ("a/b/#", "a", false),
        ("a/b/#", "a/b", true),
        ("/#", "/", true),
        ("/#", "/a", true),
        ("/#", "a", false),
        ("+/#", "a", true),
        ("+/#", "a/b/c", true),
        ("+/#", "/", true),
        ("a/+/#", "a", false),
        ("a/+/#", "a/b", true),
        ("a/+/#", "a/b/c/d", true),
        // empty levels
        ("a//b", "a//b", true),
        ("a//b", "a/b", false),
        ("a/", "a/", true),
        ("a/", "a", false),
        ("/a", "/a", true),
        ("/a", "a", false),
        ("/", "/", true),
        ("//", "//", true),
        ("//", "/", false),
        ("+//+", "a//b", true),
        // '$' topics
        ("#", "$SYS", false),
        ("#", "$SYS/broker", false),
        ("#", "$", false),
        ("+", "$SYS", false),
        ("+/broker", "$SYS/broker", false),
        ("+/#", "$SYS/broker", false),
        ("$SYS/#", "$SYS/broker", true),
        ("$SYS/#", "$SYS", true),
        ("$SYS/+", "$SYS/broker", true),
        ("$SYS/broker", "$SYS/broker", true),
        ("$SYS/broker", "$SYS/other", false),
        ("$", "$", true),
        ("a/#", "a/$b", true),
        ("a/+", "a/$b", true),
        ("+/$b", "a/$b", true),
        ("#", "a$", true),
        ("+", "a$", true),
        ("/#", "/$SYS", true),
        ("+/+", "/$SYS", true),
        // UTF-8
        ("ü/x", "ü/x", true),
        ("+/x", "ü/x", true),
        ("#", "ü/x", true),
        ("ü/#", "ü", true),
        ("u/x", "ü/x", false),
        ("温度/+", "温度/房间", true),
        ("温度/+", "温度/房间/1", false),
        ("+/房间", "温度/房间", true),
        ("€", "€", true),
        ("+", "€/", false),
    ];

    #[test]
    fn filters_match_topics() {
        for (filter, topic, want) in MATCH_CASES {
            assert_eq!(matches(filter, topic), *want, "{filter} ~ {topic}");
        }
    }

    #[test]
    fn filters_overlap() {
        let cases = [
            ("a", "a", true),
            ("a", "b", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/+/c", "+/b/+", true),
            ("a/b", "a/c", false),
            ("#", "#", true),
            ("#", "+", true),
            ("#", "a/b", true),
            ("+", "+", true),
            ("+", "a/b", false),
            ("+/+", "a/#", true),
            ("#", "$SYS/x", false),
            ("#", "$SYS/#", false),
            ("+/#", "$SYS/#", false),
            ("$SYS/#", "$SYS/+", true),
            ("$SYS/#", "$SYS", true),
            ("+/x", "$SYS/x", false),
            ("a", "a/+", false),
            ("a//b", "a/+/b", true),
            ("a//b", "a/b", false),
            ("/#", "+", true),
            ("/#", "a", false),
            ("ü/#", "+/x", true),
        ];
        for (a, b, want) in cases {
            assert_eq!(overlaps(a, b), want, "{a} ~ {b}");
            assert_eq!(overlaps(b, a), want, "{b} ~ {a}");
        }
    }

    /// Where both are topics, overlapping is being equal; where one is a topic, it is matching.
    #[test]
    fn overlap_agrees_with_matching_for_topics() {
        for (filter, topic, want) in MATCH_CASES {
            if check_topic(topic).is_ok() {
                assert_eq!(overlaps(filter, topic), *want, "{filter} ~ {topic}");
                assert_eq!(overlaps(topic, filter), *want, "{topic} ~ {filter}");
            }
        }
    }
}
