//! Retained messages: the last retained value published to each topic.
//!
//! It owns the map topic → value, generic over the value (the router keeps its messages here),
//! and finds the values whose topics a subscription's filter matches. It knows nothing of
//! messages, expiry or persistence; the caller decides what to set and remove (an empty
//! retained payload is a [`Retained::remove`]).
//!
//! What it promises:
//! - [`Retained::matching`] finds exactly the topics that
//!   [`topic::matches`](super::topic::matches) says the filter matches, `$` rule included,
//!   walking only the branches the filter's literal levels lead to.
//! - Nodes left empty by [`Retained::remove`] are freed, so memory follows the topics held.
//! - No operation recurses, so very deep topics cannot overflow the stack; replacing the
//!   value of a topic already held allocates nothing.
//!
//! Layout: a trie with one node per topic level; a node holding a value also holds its full
//! topic, so that matches can be returned as `&str` without building strings.

use std::collections::HashMap;
use std::fmt;
use std::mem;

/// Retained messages by topic, generic over the stored value.
pub struct Retained<V> {
    root: Node<V>,
    /// Topics holding a value.
    len: usize,
}

struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    /// The full topic ending here and its value.
    value: Option<(Box<str>, V)>,
}

/// A step of the walk of [`Retained::matching`].
enum Step<'a, 'f, V> {
    /// Match the rest of the filter (`None`: the filter ends at this node) below `node`;
    /// `first` when the rest is the whole filter (the `$` rule applies to its first level).
    Walk {
        node: &'a Node<V>,
        rest: Option<&'f str>,
        first: bool,
    },
    /// Everything at and below the node (a `#`).
    All(&'a Node<V>),
}

impl<V> Retained<V> {
    pub fn new() -> Self {
        Retained {
            root: Node::default(),
            len: 0,
        }
    }

    /// Keeps `value` as `topic`'s retained value. Returns the value it replaced.
    pub fn set(&mut self, topic: &str, value: V) -> Option<V> {
        if let Some(node) = self.root.find_mut(topic) {
            return match &mut node.value {
                Some((_, held)) => Some(mem::replace(held, value)),
                None => {
                    node.value = Some((topic.into(), value));
                    self.len += 1;
                    None
                }
            };
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.value = Some((topic.into(), value));
        self.len += 1;
        None
    }

    /// Forgets `topic`'s retained value and returns it.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        let node = self.root.find_mut(topic)?;
        let (_, value) = node.value.take()?;
        let emptied = node.children.is_empty();
        self.len -= 1;
        if emptied {
            self.prune(topic);
        }
        Some(value)
    }

    pub fn get(&self, topic: &str) -> Option<&V> {
        self.root.find(topic)?.value.as_ref().map(|(_, v)| v)
    }

    /// Every retained (topic, value) whose topic matches `filter` (a plain filter, no $share
    /// prefix), with the `$` rule, in `out` (cleared first; order unspecified).
    pub fn matching<'a>(&'a self, filter: &str, out: &mut Vec<(&'a str, &'a V)>) {
        out.clear();
        let mut stack = vec![Step::Walk {
            node: &self.root,
            rest: Some(filter),
            first: true,
        }];
        while let Some(step) = stack.pop() {
            let (node, rest, first) = match step {
                Step::All(node) => {
                    node.push_value(out);
                    stack.extend(node.children.values().map(Step::All));
                    continue;
                }
                Step::Walk { node, rest, first } => (node, rest, first),
            };
            let Some(rest) = rest else {
                node.push_value(out);
                continue;
            };
            let (level, next) = match rest.split_once('/') {
                Some((level, next)) => (level, Some(next)),
                None => (rest, None),
            };
            // [MQTT-4.7.2-1]: no wildcard at the first level matches a '$' level there.
            let wild = node
                .children
                .iter()
                .filter(|(key, _)| !(first && key.starts_with('$')))
                .map(|(_, child)| child);
            match (level, next) {
                ("#", None) => {
                    // '#' matches its parent level too.
                    node.push_value(out);
                    stack.extend(wild.map(Step::All));
                }
                ("+", _) => stack.extend(wild.map(|child| Step::Walk {
                    node: child,
                    rest: next,
                    first: false,
                })),
                _ => {
                    if let Some(child) = node.children.get(level) {
                        stack.push(Step::Walk {
                            node: child,
                            rest: next,
                            first: false,
                        });
                    }
                }
            }
        }
    }

    /// Topics holding a value.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every retained (topic, value), in unspecified order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        let mut stack = vec![&self.root];
        std::iter::from_fn(move || {
            while let Some(node) = stack.pop() {
                stack.extend(node.children.values());
                if let Some((topic, value)) = &node.value {
                    return Some((&**topic, value));
                }
            }
            None
        })
    }

    /// Frees the empty node of `topic`, and the ancestors that only led to it.
    fn prune(&mut self, topic: &str) {
        // The deepest node on the path that stays: the root, or one that holds a value or
        // leads elsewhere too. Everything below it on the path goes.
        let mut keep = 0;
        let mut node = &self.root;
        for (depth, level) in topic.split('/').enumerate() {
            if depth == 0 || node.value.is_some() || node.children.len() > 1 {
                keep = depth;
            }
            match node.children.get(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut levels = topic.split('/');
        let mut node = &mut self.root;
        for level in levels.by_ref().take(keep) {
            match node.children.get_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.children.remove(level);
        }
    }

    /// Nodes below the root.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        let mut stack = vec![&self.root];
        let mut count = 0;
        while let Some(node) = stack.pop() {
            count += node.children.len();
            stack.extend(node.children.values());
        }
        count
    }
}

impl<V> Default for Retained<V> {
    fn default() -> Self {
        Retained::new()
    }
}

impl<V> fmt::Debug for Retained<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retained")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<V> Node<V> {
    fn find(&self, topic: &str) -> Option<&Node<V>> {
        let mut node = self;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        Some(node)
    }

    fn find_mut(&mut self, topic: &str) -> Option<&mut Node<V>> {
        let mut node = self;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        Some(node)
    }

    fn push_value<'a>(&'a self, out: &mut Vec<(&'a str, &'a V)>) {
        if let Some((topic, value)) = &self.value {
            out.push((topic, value));
        }
    }
}

impl<V> Drop for Node<V> {
    /// Frees the subtree without recursing (a topic may have tens of thousands of levels).
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut orphans: Vec<Node<V>> = self.children.drain().map(|(_, c)| c).collect();
        while let Some(mut node) = orphans.pop() {
            orphans.extend(node.children.drain().map(|(_, c)| c));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::broker::topic::{self, tests::MATCH_CASES};

    /// The sorted topics that `filter` finds.
    fn found(store: &Retained<u32>, filter: &str) -> Vec<String> {
        let mut out = Vec::new();
        store.matching(filter, &mut out);
        for (topic, value) in &out {
            assert_eq!(store.get(topic), Some(*value), "{topic}");
        }
        let mut topics: Vec<String> = out.iter().map(|(t, _)| t.to_string()).collect();
        topics.sort_unstable();
        topics
    }

    #[test]
    fn set_get_replace_remove() {
        let mut store = Retained::new();
        assert!(store.is_empty());
        let topics = [
            "a",
            "a/b",
            "a/b/c",
            "/",
            "//",
            "a/",
            "/a",
            "a//b",
            "$SYS/x",
            "ü/温度",
        ];
        for (i, topic) in (0..).zip(topics) {
            assert_eq!(store.get(topic), None, "{topic}");
            assert_eq!(store.set(topic, i), None, "{topic}");
            assert_eq!(store.get(topic), Some(&i), "{topic}");
        }
        assert_eq!(store.len(), topics.len());
        for (i, topic) in (0..).zip(topics) {
            assert_eq!(store.set(topic, i + 100), Some(i), "{topic}");
        }
        assert_eq!(store.len(), topics.len());
        // Prefixes and extensions of held topics are not held.
        for topic in ["a/b/c/d", "a/c", "b", "///", "$SYS", "ü", "A"] {
            assert_eq!(store.get(topic), None, "{topic}");
            assert_eq!(store.remove(topic), None, "{topic}");
        }
        assert_eq!(store.len(), topics.len());
        for (i, topic) in (0..).zip(topics) {
            assert_eq!(store.remove(topic), Some(i + 100), "{topic}");
            assert_eq!(store.remove(topic), None, "{topic}");
            assert_eq!(store.get(topic), None, "{topic}");
            for later in &topics[i as usize + 1..] {
                assert!(store.get(later).is_some(), "{later} after removing {topic}");
            }
        }
        assert!(store.is_empty());
        assert_eq!(store.node_count(), 0);
    }

    #[test]
    fn each_case_alone() {
        for (filter, topic, want) in MATCH_CASES {
            let mut store = Retained::new();
            store.set(topic, 1);
            let want: Vec<String> = match want {
                true => vec![topic.to_string()],
                false => vec![],
            };
            assert_eq!(found(&store, filter), want, "{filter} ~ {topic}");
        }
    }

    /// All topics of the cases in one store: each filter finds exactly those topics that
    /// `topic::matches` says it matches.
    #[test]
    fn all_cases_together() {
        let filters: BTreeSet<&str> = MATCH_CASES.iter().map(|c| c.0).collect();
        let topics: BTreeSet<&str> = MATCH_CASES.iter().map(|c| c.1).collect();
        let mut store = Retained::new();
        for (i, topic) in (0..).zip(&topics) {
            store.set(topic, i);
        }
        assert_eq!(store.len(), topics.len());
        for filter in filters {
            let want: Vec<String> = topics
                .iter()
                .filter(|topic| topic::matches(filter, topic))
                .map(|t| t.to_string())
                .collect();
            assert_eq!(found(&store, filter), want, "{filter}");
        }
    }

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn random_topics_match_as_topic_matches_says() {
        const LEVELS: &[&str] = &["a", "b", "", "$s", "ü", "a$"];
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        let pick = |wild: bool, rng: &mut Rng| -> String {
            let n = 1 + rng.below(4);
            let mut levels: Vec<&str> = (0..n)
                .map(|_| match wild && rng.below(4) == 0 {
                    true => "+",
                    false => LEVELS[rng.below(LEVELS.len())],
                })
                .collect();
            if wild && rng.below(3) == 0 {
                levels.push("#");
            }
            // A single empty level is no topic or filter.
            match levels.join("/") {
                empty if empty.is_empty() => "/".into(),
                name => name,
            }
        };
        for round in 0..20 {
            let mut store = Retained::new();
            let mut held = BTreeSet::new();
            for i in 0..30 {
                let topic = pick(false, &mut rng);
                store.set(&topic, i);
                held.insert(topic);
            }
            assert_eq!(store.len(), held.len());
            for _ in 0..100 {
                let filter = pick(true, &mut rng);
                let want: Vec<String> = held
                    .iter()
                    .filter(|topic| topic::matches(&filter, topic))
                    .cloned()
                    .collect();
                assert_eq!(found(&store, &filter), want, "round {round}: {filter}");
            }
            for topic in &held {
                assert!(store.remove(topic).is_some(), "{topic}");
            }
            assert!(store.is_empty());
            assert_eq!(store.node_count(), 0, "round {round}");
        }
    }

    #[test]
    fn dollar_topics() {
        let mut store = Retained::new();
        for (i, topic) in (0..).zip(["$SYS/x", "$SYS", "$", "a/$b", "a", "$share/g/a"]) {
            store.set(topic, i);
        }
        let cases: &[(&str, &[&str])] = &[
            ("#", &["a", "a/$b"]),
            ("+", &["a"]),
            ("+/#", &["a", "a/$b"]),
            ("+/x", &[]),
            ("$SYS/#", &["$SYS", "$SYS/x"]),
            ("$SYS/+", &["$SYS/x"]),
            ("$", &["$"]),
            ("$/#", &["$"]),
            ("a/+", &["a/$b"]),
            ("$share/#", &["$share/g/a"]),
        ];
        for (filter, want) in cases {
            assert_eq!(found(&store, filter), *want, "{filter}");
        }
    }

    #[test]
    fn removal_prunes_only_what_is_unused() {
        let mut store = Retained::new();
        store.set("a", 0);
        store.set("a/b/c/d", 1);
        store.set("a/b/x", 2);
        // a, b, c, d, x
        assert_eq!(store.node_count(), 5);
        store.remove("a/b/c/d");
        assert_eq!(store.node_count(), 3);
        store.remove("a/b/x");
        assert_eq!(store.node_count(), 1);
        store.set("a/b", 3);
        store.remove("a");
        assert_eq!(store.node_count(), 2);
        assert_eq!(found(&store, "a/#"), ["a/b"]);
        store.remove("a/b");
        assert_eq!(store.node_count(), 0);
    }

    #[test]
    fn churn_does_not_grow_the_store() {
        let mut store = Retained::new();
        store.set("keep", 0);
        for i in 0..1000 {
            let topic = format!("dev/{i}/state");
            store.set(&topic, i);
            assert_eq!(found(&store, "dev/+/state"), [topic.as_str()]);
            assert_eq!(store.remove(&topic), Some(i));
            assert_eq!(store.node_count(), 1);
        }
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn matching_clears_out() {
        let mut store = Retained::new();
        store.set("a", 1);
        let mut out = vec![("x", &7)];
        store.matching("b", &mut out);
        assert!(out.is_empty());
        store.matching("a", &mut out);
        assert_eq!(out, [("a", &1)]);
    }

    #[test]
    fn iter_yields_every_value_once() {
        let mut store = Retained::new();
        let topics = ["a", "a/b", "/", "$SYS/x", "ü"];
        for (i, topic) in (0..).zip(topics) {
            store.set(topic, i);
        }
        let mut got: Vec<(&str, u32)> = store.iter().map(|(t, &v)| (t, v)).collect();
        got.sort_unstable();
        let mut want: Vec<(&str, u32)> = topics.iter().copied().zip(0..).collect();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(Retained::<u32>::new().iter().count(), 0);
    }

    #[test]
    fn very_deep_topics_do_not_overflow_the_stack() {
        let deep = vec!["a"; 30_000].join("/");
        let mut store = Retained::new();
        store.set(&deep, 1);
        store.set(&format!("{deep}/b"), 2);
        assert_eq!(found(&store, "#").len(), 2);
        assert_eq!(found(&store, &format!("{deep}/+")), [format!("{deep}/b")]);
        assert_eq!(store.remove(&format!("{deep}/b")), Some(2));
        assert_eq!(store.get(&deep), Some(&1));
        // Dropping the store frees the deep path.
        drop(store);
    }
}
