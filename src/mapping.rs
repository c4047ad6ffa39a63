//! MQTT topic ↔ NATS subject mapping.
//!
//! The rules are the ones nats-server applies to its own MQTT clients, so that users moving from
//! a nats-server MQTT leaf see the same subjects:
//!
//! | MQTT topic     | NATS subject     | rule                                   |
//! |----------------|------------------|----------------------------------------|
//! | `a/b/c`        | `a.b.c`          | `/` between two levels becomes `.`     |
//! | `/a`           | `/.a`            | a leading `/` becomes `/.`             |
//! | `a/`           | `a./`            | a trailing `/` becomes `./`            |
//! | `a//b`         | `a./.b`          | a `/` next to another `/` becomes `./` |
//! | `a.b`          | `a//b`           | a `.` becomes `//`                     |
//! | `a/+/c`, `a/#` | `a.*.c`, `a.>`   | wildcards map to NATS wildcards        |
//!
//! A topic with a space cannot be a subject and is refused. Every subject the relay uses is
//! `<subject_prefix>.<mapped topic>`.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Why a topic, filter or subject cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("topic {0:?} is empty")]
    Empty(String),
    #[error("topic {0:?} contains a space, which no NATS subject can carry")]
    Space(String),
    #[error("topic filter {0:?} is not a valid MQTT filter ('#' must be last and alone in its level, '+' alone in its level)")]
    BadFilter(String),
    #[error("topic {0:?} contains a wildcard ('+' or '#'), which a published topic may not")]
    WildcardInTopic(String),
    #[error("subject {0:?} is not under this relay's prefix")]
    NotUnderPrefix(String),
    #[error("subject prefix {0:?} must be non-empty NATS tokens separated by '.', without spaces or wildcards")]
    BadPrefix(String),
}

/// Checks a `subject_prefix` from the config.
pub fn check_subject_prefix(prefix: &str) -> Result<(), MappingError> {
    let bad = prefix.is_empty()
        || prefix
            .split('.')
            .any(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>'));
    if bad {
        Err(MappingError::BadPrefix(prefix.to_owned()))
    } else {
        Ok(())
    }
}

/// A validated MQTT topic filter (may hold `+` and `#`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter(String);

impl TopicFilter {
    pub fn new(filter: &str) -> Result<TopicFilter, MappingError> {
        if filter.is_empty() {
            return Err(MappingError::Empty(filter.to_owned()));
        }
        if filter.contains(' ') {
            return Err(MappingError::Space(filter.to_owned()));
        }
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            let has_hash = level.contains('#');
            let has_plus = level.contains('+');
            if (has_hash && (*level != "#" || i + 1 != levels.len())) || (has_plus && *level != "+")
            {
                return Err(MappingError::BadFilter(filter.to_owned()));
            }
        }
        Ok(TopicFilter(filter.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` (a concrete, published topic) matches this filter, by MQTT rules:
    /// a filter starting with a wildcard does not match topics starting with `$`.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && (self.0.starts_with('+') || self.0.starts_with('#')) {
            return false;
        }
        let mut t = topic.split('/');
        for f in self.0.split('/') {
            match f {
                "#" => return true,
                "+" => {
                    if t.next().is_none() {
                        return false;
                    }
                }
                level => {
                    if t.next() != Some(level) {
                        return false;
                    }
                }
            }
        }
        t.next().is_none()
    }

    /// The NATS subject filters that together match what this MQTT filter matches, under
    /// `prefix`. `a/#` matches `a` itself as well as everything below it, so it needs two.
    pub fn to_subjects(&self, prefix: &str) -> Vec<String> {
        let body = convert(&self.0, true);
        let mut out = Vec::with_capacity(2);
        if self.0 == "#" {
            out.push(format!("{prefix}.>"));
        } else if let Some(parent) = self.0.strip_suffix("/#") {
            out.push(format!("{prefix}.{}", convert(parent, true)));
            out.push(format!("{prefix}.{body}"));
        } else {
            out.push(format!("{prefix}.{body}"));
        }
        out
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TopicFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TopicFilter::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The subject a published topic goes to under `prefix`.
pub fn topic_to_subject(prefix: &str, topic: &str) -> Result<String, MappingError> {
    if topic.is_empty() {
        return Err(MappingError::Empty(topic.to_owned()));
    }
    if topic.contains(' ') {
        return Err(MappingError::Space(topic.to_owned()));
    }
    if topic.contains('+') || topic.contains('#') {
        return Err(MappingError::WildcardInTopic(topic.to_owned()));
    }
    Ok(format!("{prefix}.{}", convert(topic, false)))
}

/// The MQTT topic of a subject under `prefix`: the inverse of [`topic_to_subject`].
pub fn subject_to_topic(prefix: &str, subject: &str) -> Result<String, MappingError> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .filter(|r| !r.is_empty())
        .ok_or_else(|| MappingError::NotUnderPrefix(subject.to_owned()))?;
    let bytes = rest.as_bytes();
    let mut topic = String::with_capacity(rest.len());
    let mut i = 0;
    while i < bytes.len() {
        let next = bytes.get(i + 1).copied();
        let after = bytes.get(i + 2).copied();
        match (bytes[i], next) {
            // `//` is an escaped `.`.
            (b'/', Some(b'/')) => {
                topic.push('.');
                i += 2;
            }
            // `/.` stands for a `/` at the start or after an empty level.
            (b'/', Some(b'.')) => {
                topic.push('/');
                i += 2;
            }
            // `./` before the end or another separator stands for a `/` before an empty level.
            (b'.', Some(b'/')) if after.is_none() || after == Some(b'.') => {
                topic.push('/');
                i += 2;
            }
            (b'.', _) => {
                topic.push('/');
                i += 1;
            }
            _ => {
                // Copy one whole UTF-8 character.
                let ch_len = rest[i..].chars().next().map_or(1, char::len_utf8);
                topic.push_str(&rest[i..i + ch_len]);
                i += ch_len;
            }
        }
    }
    Ok(topic)
}

/// Converts a topic (or, with `filter`, a topic filter) into the subject body.
fn convert(topic: &str, filter: bool) -> String {
    let bytes = topic.as_bytes();
    let mut out = String::with_capacity(topic.len() + 4);
    for (i, ch) in topic.char_indices() {
        match ch {
            '/' => {
                if i == 0 || out.ends_with('.') {
                    out.push_str("/.");
                } else if i + 1 == bytes.len() || bytes[i + 1] == b'/' {
                    out.push_str("./");
                } else {
                    out.push('.');
                }
            }
            '.' => out.push_str("//"),
            '+' if filter => out.push('*'),
            '#' if filter => out.push('>'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_map_as_nats_server_documents() {
        let cases = [
            ("sensors/cold-1/temp", "p.sensors.cold-1.temp"),
            ("/sensors/temp", "p./.sensors.temp"),
            ("sensors/temp/", "p.sensors.temp./"),
            ("sensors//temp", "p.sensors./.temp"),
            ("//sensors/temp", "p././.sensors.temp"),
            ("cold-1.temp", "p.cold-1//temp"),
            ("spBv1.0/plant1", "p.spBv1//0.plant1"),
            ("a", "p.a"),
            ("ünï/cødé", "p.ünï.cødé"),
        ];
        for (topic, subject) in cases {
            assert_eq!(topic_to_subject("p", topic).unwrap(), subject, "{topic}");
        }
    }

    #[test]
    fn subjects_map_back_to_the_same_topics() {
        for topic in [
            "sensors/cold-1/temp",
            "/sensors/temp",
            "sensors/temp/",
            "sensors//temp",
            "cold-1.temp",
            "spBv1.0/plant1",
            "a",
            "a.b.c/d",
            "a/.b",
            "a/./b",
            "a./",
            "a..",
            "/",
            "//",
            "a///b",
            "./.",
            "ünï/cødé",
        ] {
            let subject = topic_to_subject("org.office", topic).unwrap();
            assert_eq!(
                subject_to_topic("org.office", &subject).unwrap(),
                topic,
                "via {subject}"
            );
        }
    }

    #[test]
    fn bad_topics_are_refused() {
        assert_eq!(
            topic_to_subject("p", "a b"),
            Err(MappingError::Space("a b".into()))
        );
        assert!(topic_to_subject("p", "").is_err());
        assert!(topic_to_subject("p", "a/+").is_err());
        assert!(subject_to_topic("p", "q.a").is_err());
        assert!(subject_to_topic("p", "p.").is_err());
        assert!(subject_to_topic("p", "pa.b").is_err());
    }

    #[test]
    fn filters_validate_and_map() {
        let cases: &[(&str, &[&str])] = &[
            ("a/b", &["p.a.b"]),
            ("a/+/c", &["p.a.*.c"]),
            ("a/#", &["p.a", "p.a.>"]),
            ("#", &["p.>"]),
            ("+", &["p.*"]),
            ("a.b/#", &["p.a//b", "p.a//b.>"]),
        ];
        for (filter, subjects) in cases {
            let f = TopicFilter::new(filter).unwrap();
            assert_eq!(f.to_subjects("p"), *subjects, "{filter}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "a b", "##"] {
            assert!(TopicFilter::new(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn filters_match_topics_by_mqtt_rules() {
        let cases = [
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("+/+", "/x", true),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(
                TopicFilter::new(filter).unwrap().matches(topic),
                want,
                "{filter} vs {topic}"
            );
        }
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_subject_prefix("org.office-1").is_ok());
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
            assert!(check_subject_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
