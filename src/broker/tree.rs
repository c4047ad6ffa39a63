//! The subscription tree: which sessions' subscriptions match a published topic.
//!
//! It owns the subscriptions (filter, session, options), plain and shared
//! (`$share/<group>/<filter>`), and the round-robin state of each shared group. It knows nothing
//! of sessions beyond their ids, and nothing of ACLs, packets or delivery.
//!
//! What it promises:
//! - It matches exactly as [`topic::matches`](super::topic::matches) does, `$` rule included.
//! - [`Tree::matches`] returns every matching plain subscription once (a session holding
//!   overlapping filters gets one [`Match`] per filter; merging them is the router's job), and
//!   one member of every matching shared group, chosen round-robin among the members that are
//!   online (among all of them when none is).
//! - Nodes left empty by [`Tree::remove`] are freed, so memory follows the subscriptions held,
//!   not the churn.
//! - A match allocates nothing beyond growing `out` (its walk stack keeps its allocation from
//!   one call to the next), and no operation recurses, so very deep topics and filters cannot
//!   overflow the stack. Memory is about one trie node per distinct filter level prefix.
//!
//! Layout: a trie with one node per filter level. A node's literal children are in a map, its
//! `+` child apart, and the subscriptions of a filter ending in `#` below it in `hash`; the
//! subscriptions of a filter ending at the node are in `subs`.

use std::collections::HashMap;
use std::fmt;
use std::mem;
use std::sync::Arc;

use super::topic::Filter;

/// A session as the tree knows it.
pub type SessionId = u64;

/// The options of one subscription (MQTT 5.0 section 3.8.3.1; 3.1.1 has only `qos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    /// The subscription identifier, if the SUBSCRIBE carried one.
    pub id: Option<u32>,
}

/// One subscription that matches a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub session: SessionId,
    pub opts: SubOptions,
    /// Whether it is a shared subscription (this session was chosen for its group).
    pub shared: bool,
}

/// The subscriptions of all sessions.
#[derive(Default)]
pub struct Tree {
    root: Node,
    /// Subscriptions held; shared memberships count one each.
    len: usize,
    /// The walk stack of [`Tree::matches`], always empty between calls: kept for its allocation.
    stack: Vec<Frame<'static>>,
}

#[derive(Default)]
struct Node {
    /// Literal next levels.
    children: HashMap<Box<str>, Node>,
    /// The `+` next level.
    plus: Option<Box<Node>>,
    /// Subscriptions of the filter ending at this node.
    subs: Subs,
    /// Subscriptions of the filter ending at this node followed by `/#` (at the root: `#`).
    hash: Option<Box<Subs>>,
}

#[derive(Default)]
struct Subs {
    plain: HashMap<SessionId, SubOptions>,
    shared: HashMap<Arc<str>, Group>,
}

/// The members of one shared subscription (group name + filter), in the order they joined.
#[derive(Default)]
struct Group {
    members: Vec<(SessionId, SubOptions)>,
    /// Where the next round-robin choice starts; below `members.len()` unless that is 0.
    next: usize,
}

/// A node still to visit in [`Tree::matches`], with the part of the topic below it (`None` when
/// the node is at the topic's last level).
struct Frame<'a> {
    node: &'a mut Node,
    rest: Option<&'a str>,
    /// Whether `rest` is the whole topic (the `$` rule applies to its first level).
    first: bool,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Adds or replaces `session`'s subscription to `filter` (a shared one joins the group).
    /// Returns the options it replaced.
    pub fn insert(
        &mut self,
        filter: &Filter,
        session: SessionId,
        opts: SubOptions,
    ) -> Option<SubOptions> {
        let (levels, hash) = path(&filter.filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_or_insert(level);
        }
        let subs = match hash {
            true => node.hash.get_or_insert_with(Box::default),
            false => &mut node.subs,
        };
        let old = subs.insert(filter.group.as_ref(), session, opts);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Removes `session`'s subscription to `filter` (a shared one leaves the group). Returns its
    /// options, or `None` if it held none.
    pub fn remove(&mut self, filter: &Filter, session: SessionId) -> Option<SubOptions> {
        let group = filter.group.as_deref();
        let (levels, hash) = path(&filter.filter);
        let mut node = &mut self.root;
        for level in levels {
            node = node.child_mut(level)?;
        }
        let old = match hash {
            true => {
                let subs = node.hash.as_deref_mut()?;
                let old = subs.remove(group, session)?;
                if subs.is_empty() {
                    node.hash = None;
                }
                old
            }
            false => node.subs.remove(group, session)?,
        };
        let emptied = node.is_empty();
        self.len -= 1;
        if emptied {
            self.prune(&filter.filter);
        }
        Some(old)
    }

    /// Every subscription matching `topic`, appended to `out` (cleared first): each non-shared
    /// subscription once; for each shared group (group name + filter) whose filter matches,
    /// exactly one member, chosen round-robin, preferring members for which `online(session)`
    /// is true (if none is online, still one member, round-robin).
    ///
    /// `topic` should be a valid topic name ([`check_topic`](super::topic::check_topic)); the
    /// order of `out` is unspecified.
    pub fn matches(
        &mut self,
        topic: &str,
        online: impl Fn(SessionId) -> bool,
        out: &mut Vec<Match>,
    ) {
        out.clear();
        let mut stack = recycle(mem::take(&mut self.stack));
        stack.push(Frame {
            node: &mut self.root,
            rest: Some(topic),
            first: true,
        });
        while let Some(Frame { node, rest, first }) = stack.pop() {
            let Node {
                children,
                plus,
                subs,
                hash,
            } = node;
            let Some(rest) = rest else {
                // The topic ends here: the filter ending here matches, and so does the one
                // ending in '#' here ('#' matches its parent level).
                subs.collect(&online, out);
                if let Some(hash) = hash {
                    hash.collect(&online, out);
                }
                continue;
            };
            let (level, next) = match rest.split_once('/') {
                Some((level, next)) => (level, Some(next)),
                None => (rest, None),
            };
            // [MQTT-4.7.2-1]: no wildcard at the first level matches a '$' level there.
            if !(first && level.starts_with('$')) {
                if let Some(hash) = hash {
                    hash.collect(&online, out);
                }
                if let Some(plus) = plus {
                    stack.push(Frame {
                        node: plus,
                        rest: next,
                        first: false,
                    });
                }
            }
            if let Some(child) = children.get_mut(level) {
                stack.push(Frame {
                    node: child,
                    rest: next,
                    first: false,
                });
            }
        }
        self.stack = recycle(stack);
    }

    /// Subscriptions held (shared memberships count one each).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frees the empty last node of `filter`'s path, and the ancestors that only led to it.
    fn prune(&mut self, filter: &str) {
        // The deepest node on the path that stays: the root, or one that holds subscriptions or
        // leads elsewhere too. Everything below it on the path goes.
        let mut keep = 0;
        let mut node = &self.root;
        for (depth, level) in path(filter).0.enumerate() {
            if depth == 0 || !node.subs.is_empty() || node.hash.is_some() || node.edges() > 1 {
                keep = depth;
            }
            match node.child(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        let mut levels = path(filter).0;
        let mut node = &mut self.root;
        for level in levels.by_ref().take(keep) {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return,
            }
        }
        if let Some(level) = levels.next() {
            node.remove_child(level);
        }
    }

    /// Nodes below the root, and `#` subscription holders.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        fn count(node: &Node) -> usize {
            usize::from(node.hash.is_some())
                + node.children.values().map(|c| 1 + count(c)).sum::<usize>()
                + node.plus.as_deref().map_or(0, |c| 1 + count(c))
        }
        count(&self.root)
    }
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tree")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Empties `stack` and gives back its allocation for another lifetime (the collect reuses the
/// buffer in place, as the element types have the same layout).
// `filter_map` rather than `filter`: the item type changes (its lifetime).
#[allow(clippy::unnecessary_filter_map)]
fn recycle<'b>(mut stack: Vec<Frame<'_>>) -> Vec<Frame<'b>> {
    stack.clear();
    stack.into_iter().filter_map(|_| None).collect()
}

/// The levels of the nodes on `filter`'s path from the root (the root itself excluded), and
/// whether the filter ends in a `#` that the last of them holds.
fn path(filter: &str) -> (impl Iterator<Item = &str>, bool) {
    let (nodes, hash) = if filter == "#" {
        (None, true)
    } else if let Some(parent) = filter.strip_suffix("/#") {
        (Some(parent), true)
    } else {
        (Some(filter), false)
    };
    (nodes.into_iter().flat_map(|n| n.split('/')), hash)
}

impl Node {
    fn child(&self, level: &str) -> Option<&Node> {
        match level {
            "+" => self.plus.as_deref(),
            _ => self.children.get(level),
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node> {
        match level {
            "+" => self.plus.as_deref_mut(),
            _ => self.children.get_mut(level),
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node {
        match level {
            "+" => self.plus.get_or_insert_with(Box::default),
            _ => self.children.entry(level.into()).or_default(),
        }
    }

    fn remove_child(&mut self, level: &str) {
        match level {
            "+" => self.plus = None,
            _ => {
                self.children.remove(level);
            }
        }
    }

    fn edges(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some())
    }

    fn is_empty(&self) -> bool {
        self.edges() == 0 && self.subs.is_empty() && self.hash.is_none()
    }
}

impl Drop for Node {
    /// Frees the subtree without recursing (a filter may have tens of thousands of levels).
    fn drop(&mut self) {
        fn detach(node: &mut Node, into: &mut Vec<Node>) {
            into.extend(node.children.drain().map(|(_, child)| child));
            if let Some(plus) = node.plus.take() {
                into.push(*plus);
            }
        }
        if self.edges() == 0 {
            return;
        }
        let mut orphans = Vec::new();
        detach(self, &mut orphans);
        while let Some(mut node) = orphans.pop() {
            detach(&mut node, &mut orphans);
        }
    }
}

impl Subs {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.shared.is_empty()
    }

    fn insert(
        &mut self,
        group: Option<&Arc<str>>,
        session: SessionId,
        opts: SubOptions,
    ) -> Option<SubOptions> {
        match group {
            None => self.plain.insert(session, opts),
            Some(group) => self
                .shared
                .entry(Arc::clone(group))
                .or_default()
                .insert(session, opts),
        }
    }

    fn remove(&mut self, group: Option<&str>, session: SessionId) -> Option<SubOptions> {
        match group {
            None => self.plain.remove(&session),
            Some(name) => {
                let group = self.shared.get_mut(name)?;
                let old = group.remove(session)?;
                if group.members.is_empty() {
                    self.shared.remove(name);
                }
                Some(old)
            }
        }
    }

    fn collect(&mut self, online: &impl Fn(SessionId) -> bool, out: &mut Vec<Match>) {
        out.extend(self.plain.iter().map(|(&session, &opts)| Match {
            session,
            opts,
            shared: false,
        }));
        for group in self.shared.values_mut() {
            if let Some((session, opts)) = group.pick(online) {
                out.push(Match {
                    session,
                    opts,
                    shared: true,
                });
            }
        }
    }
}

impl Group {
    fn insert(&mut self, session: SessionId, opts: SubOptions) -> Option<SubOptions> {
        match self.members.iter_mut().find(|(s, _)| *s == session) {
            Some((_, held)) => Some(mem::replace(held, opts)),
            None => {
                self.members.push((session, opts));
                None
            }
        }
    }

    fn remove(&mut self, session: SessionId) -> Option<SubOptions> {
        let at = self.members.iter().position(|(s, _)| *s == session)?;
        let (_, opts) = self.members.remove(at);
        if at < self.next {
            self.next -= 1;
        }
        if self.next >= self.members.len() {
            self.next = 0;
        }
        Some(opts)
    }

    /// The next online member from the cursor on, or the member at the cursor if none is
    /// online; the cursor moves past the one chosen.
    fn pick(&mut self, online: &impl Fn(SessionId) -> bool) -> Option<(SessionId, SubOptions)> {
        let n = self.members.len();
        let start = self.next % n.max(1);
        let chosen = (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| online(self.members[i].0))
            .unwrap_or(start);
        let member = *self.members.get(chosen)?;
        self.next = (chosen + 1) % n;
        Some(member)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::broker::topic::{self, tests::MATCH_CASES};

    fn f(s: &str) -> Filter {
        Filter::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn qos(qos: u8) -> SubOptions {
        SubOptions {
            qos,
            ..SubOptions::default()
        }
    }

    fn all_online(_: SessionId) -> bool {
        true
    }

    /// Sorted (session, shared) of the matches.
    fn hits(tree: &mut Tree, topic: &str) -> Vec<(SessionId, bool)> {
        let mut out = Vec::new();
        tree.matches(topic, all_online, &mut out);
        let mut hits: Vec<_> = out.iter().map(|m| (m.session, m.shared)).collect();
        hits.sort_unstable();
        hits
    }

    #[test]
    fn each_case_alone() {
        for (filter, topic, want) in MATCH_CASES {
            let mut tree = Tree::new();
            tree.insert(&f(filter), 7, qos(1));
            let mut out = vec![Match {
                session: 99,
                opts: qos(0),
                shared: false,
            }];
            tree.matches(topic, all_online, &mut out);
            let expected = match want {
                true => vec![Match {
                    session: 7,
                    opts: qos(1),
                    shared: false,
                }],
                false => vec![],
            };
            assert_eq!(out, expected, "{filter} ~ {topic}");
        }
    }

    /// All filters of the cases in one tree: each topic matches exactly those filters that
    /// `topic::matches` says it does.
    #[test]
    fn all_cases_together() {
        let filters: BTreeSet<&str> = MATCH_CASES.iter().map(|c| c.0).collect();
        let topics: BTreeSet<&str> = MATCH_CASES.iter().map(|c| c.1).collect();
        let mut tree = Tree::new();
        let ids: BTreeMap<&str, SessionId> = filters.iter().copied().zip(1..).collect();
        for (filter, &id) in &ids {
            assert_eq!(tree.insert(&f(filter), id, qos(0)), None);
        }
        assert_eq!(tree.len(), filters.len());
        for topic in topics {
            // Ids ascend with the filters, so `want` is sorted.
            let want: Vec<_> = ids
                .iter()
                .filter(|(filter, _)| topic::matches(filter, topic))
                .map(|(_, &id)| (id, false))
                .collect();
            assert_eq!(hits(&mut tree, topic), want, "{topic}");
        }
    }

    /// A small xorshift generator: reproducible random filters and topics.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    const LEVELS: &[&str] = &["a", "b", "", "$s", "ü", "a$"];

    fn random_topic(rng: &mut Rng) -> String {
        let n = 1 + rng.below(4);
        let levels: Vec<&str> = (0..n).map(|_| rng.pick(LEVELS)).collect();
        non_empty(levels.join("/"))
    }

    /// A single empty level is no topic or filter.
    fn non_empty(s: String) -> String {
        match s.is_empty() {
            true => "/".into(),
            false => s,
        }
    }

    fn random_filter(rng: &mut Rng) -> String {
        let n = 1 + rng.below(4);
        let mut levels: Vec<&str> = (0..n)
            .map(|_| match rng.below(4) {
                0 => "+",
                _ => rng.pick(LEVELS),
            })
            .collect();
        if rng.below(3) == 0 {
            levels.push("#");
        }
        non_empty(levels.join("/"))
    }

    #[test]
    fn random_filters_match_as_topic_matches_says() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..20 {
            let mut tree = Tree::new();
            let mut held: Vec<(String, SessionId)> = Vec::new();
            for id in 0..40 {
                let filter = random_filter(&mut rng);
                if tree.insert(&f(&filter), id % 7, qos(0)).is_none() {
                    held.push((filter, id % 7));
                }
            }
            assert_eq!(tree.len(), held.len());
            for _ in 0..100 {
                let topic = random_topic(&mut rng);
                let mut want: Vec<_> = held
                    .iter()
                    .filter(|(filter, _)| topic::matches(filter, &topic))
                    .map(|&(_, id)| (id, false))
                    .collect();
                want.sort_unstable();
                assert_eq!(hits(&mut tree, &topic), want, "round {round}: {topic}");
            }
            for (filter, id) in &held {
                assert_eq!(tree.remove(&f(filter), *id), Some(qos(0)), "{filter}");
            }
            assert!(tree.is_empty());
            assert_eq!(tree.node_count(), 0, "round {round}");
        }
    }

    #[test]
    fn overlapping_subscriptions_of_one_session_each_match() {
        let mut tree = Tree::new();
        for (filter, q) in [("a/+", 0), ("a/#", 1), ("a/b", 2), ("#", 0), ("+/+", 1)] {
            tree.insert(&f(filter), 1, qos(q));
        }
        tree.insert(&f("a/b"), 2, qos(0));
        let mut out = Vec::new();
        tree.matches("a/b", all_online, &mut out);
        let mut got: Vec<_> = out.iter().map(|m| (m.session, m.opts.qos)).collect();
        got.sort_unstable();
        assert_eq!(got, [(1, 0), (1, 0), (1, 1), (1, 1), (1, 2), (2, 0)]);
        assert_eq!(hits(&mut tree, "a"), [(1, false), (1, false)]); // a/# and #
        assert_eq!(hits(&mut tree, "$a/b"), []);
    }

    #[test]
    fn insert_replaces_and_returns_the_old_options() {
        let mut tree = Tree::new();
        let opts = SubOptions {
            qos: 2,
            no_local: true,
            retain_as_published: true,
            retain_handling: 1,
            id: Some(42),
        };
        for filter in ["a/b", "a/#", "#", "+", "$share/g/a/b", "$share/g/#"] {
            let filter = f(filter);
            assert_eq!(tree.insert(&filter, 1, qos(0)), None, "{filter}");
            assert_eq!(tree.insert(&filter, 1, opts), Some(qos(0)), "{filter}");
            assert_eq!(tree.insert(&filter, 1, qos(1)), Some(opts), "{filter}");
            assert_eq!(tree.insert(&filter, 2, qos(1)), None, "{filter}");
        }
        assert_eq!(tree.len(), 12);
        let mut out = Vec::new();
        tree.matches("a/b", all_online, &mut out);
        assert!(out.iter().all(|m| m.opts == qos(1)));
        // a/b, a/#, # twice each; the two groups once each.
        assert_eq!(out.len(), 8);
    }

    #[test]
    fn remove_returns_the_options_and_prunes() {
        let mut tree = Tree::new();
        let filters = [
            "a",
            "a/b",
            "a/b/c",
            "a/+/c",
            "a/#",
            "#",
            "+",
            "+/+",
            "/",
            "//",
            "a//b",
            "$SYS/#",
            "ü/温度/+",
            "a/b/c/d/e/f",
        ];
        for (i, filter) in filters.iter().enumerate() {
            tree.insert(&f(filter), 1, qos(0));
            tree.insert(&f(filter), 2, qos(1));
            tree.insert(&f(&format!("$share/g{i}/{filter}")), 3, qos(2));
        }
        assert_eq!(tree.len(), 3 * filters.len());
        assert!(tree.node_count() > 0);
        // Absent subscriptions are not there to remove.
        assert_eq!(tree.remove(&f("a/b/c/d"), 1), None);
        assert_eq!(tree.remove(&f("x/y"), 1), None);
        assert_eq!(tree.remove(&f("a"), 9), None);
        assert_eq!(tree.remove(&f("$share/g0/a/b"), 3), None);
        assert_eq!(tree.remove(&f("$share/h/a"), 3), None);
        assert_eq!(tree.len(), 3 * filters.len());

        // Remove in a different order than inserted, checking the rest still matches.
        for (i, filter) in filters.iter().enumerate().rev() {
            assert_eq!(tree.remove(&f(filter), 1), Some(qos(0)), "{filter}");
            assert_eq!(tree.remove(&f(filter), 1), None, "{filter}");
            let shared = f(&format!("$share/g{i}/{filter}"));
            assert_eq!(tree.remove(&shared, 3), Some(qos(2)), "{filter}");
            assert_eq!(tree.remove(&shared, 3), None, "{filter}");
            assert_eq!(tree.remove(&f(filter), 2), Some(qos(1)), "{filter}");
            for topic in ["a", "a/b/c", "a/x/c", "/", "a//b", "$SYS/x", "ü/温度/x"] {
                let mut want: Vec<_> = filters[..i]
                    .iter()
                    .filter(|filter| topic::matches(filter, topic))
                    .flat_map(|_| [(1, false), (2, false), (3, true)])
                    .collect();
                want.sort_unstable();
                assert_eq!(hits(&mut tree, topic), want, "{topic} after {filter}");
            }
        }
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn removing_a_leaf_keeps_the_ancestors_in_use() {
        let mut tree = Tree::new();
        tree.insert(&f("a"), 1, qos(0));
        tree.insert(&f("a/#"), 1, qos(0));
        tree.insert(&f("a/b/c/d"), 1, qos(0));
        tree.insert(&f("a/b/x"), 1, qos(0));
        // a, a's '#', b, c, d, x
        assert_eq!(tree.node_count(), 6);
        tree.remove(&f("a/b/c/d"), 1);
        assert_eq!(tree.node_count(), 4);
        tree.remove(&f("a/b/x"), 1);
        assert_eq!(tree.node_count(), 2);
        tree.remove(&f("a"), 1);
        assert_eq!(tree.node_count(), 2);
        assert_eq!(hits(&mut tree, "a"), [(1, false)]);
        tree.remove(&f("a/#"), 1);
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn churn_does_not_grow_the_tree() {
        let mut tree = Tree::new();
        tree.insert(&f("keep/+"), 1, qos(0));
        let base = tree.node_count();
        for i in 0..1000u64 {
            let filter = f(&format!("dev/{i}/+/#"));
            tree.insert(&filter, i, qos(0));
            let shared = f(&format!("$share/g/dev/{i}/#"));
            tree.insert(&shared, i, qos(0));
            assert_eq!(
                hits(&mut tree, &format!("dev/{i}/x")),
                [(i, false), (i, true)]
            );
            tree.remove(&filter, i);
            tree.remove(&shared, i);
            assert_eq!(tree.node_count(), base);
        }
        assert_eq!(tree.len(), 1);
    }

    /// Which member of each group gets each of `n` publishes to `topic`.
    fn deliveries(
        tree: &mut Tree,
        topic: &str,
        n: usize,
        online: impl Fn(SessionId) -> bool,
    ) -> Vec<SessionId> {
        let mut out = Vec::new();
        (0..n)
            .map(|_| {
                tree.matches(topic, &online, &mut out);
                assert_eq!(out.len(), 1);
                assert!(out[0].shared);
                out[0].session
            })
            .collect()
    }

    #[test]
    fn shared_round_robin_is_fair() {
        let mut tree = Tree::new();
        for id in [10, 20, 30] {
            tree.insert(&f("$share/g/s/+"), id, qos(1));
        }
        let got = deliveries(&mut tree, "s/x", 300, all_online);
        for id in [10, 20, 30] {
            assert_eq!(got.iter().filter(|&&s| s == id).count(), 100, "{id}");
        }
        for pair in got.windows(3) {
            let distinct: BTreeSet<_> = pair.iter().collect();
            assert_eq!(distinct.len(), 3, "{got:?}");
        }
    }

    #[test]
    fn shared_round_robin_stays_fair_as_members_come_and_go() {
        let mut tree = Tree::new();
        let g = f("$share/g/t");
        for id in 1..=4 {
            tree.insert(&g, id, qos(0));
        }
        assert_eq!(deliveries(&mut tree, "t", 2, all_online), [1, 2]);
        // The cursor is at 3; removing one behind it does not skip 3.
        tree.remove(&g, 1);
        assert_eq!(deliveries(&mut tree, "t", 4, all_online), [3, 4, 2, 3]);
        // The cursor is at 4 (last); removing it wraps to the first.
        tree.remove(&g, 4);
        assert_eq!(deliveries(&mut tree, "t", 2, all_online), [2, 3]);
        tree.insert(&g, 5, qos(0));
        assert_eq!(
            deliveries(&mut tree, "t", 6, all_online),
            [2, 3, 5, 2, 3, 5]
        );
        // Replacing options keeps the place in the rotation.
        tree.insert(&g, 3, qos(2));
        assert_eq!(deliveries(&mut tree, "t", 3, all_online), [2, 3, 5]);
        tree.remove(&g, 2);
        tree.remove(&g, 3);
        assert_eq!(deliveries(&mut tree, "t", 2, all_online), [5, 5]);
        tree.remove(&g, 5);
        assert_eq!(hits(&mut tree, "t"), []);
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn shared_prefers_online_members() {
        let mut tree = Tree::new();
        for id in 1..=4 {
            tree.insert(&f("$share/g/#"), id, qos(0));
        }
        let got = deliveries(&mut tree, "x", 6, |s| s == 2 || s == 4);
        assert_eq!(got, [2, 4, 2, 4, 2, 4]);
        let got = deliveries(&mut tree, "x", 3, |s| s == 3);
        assert_eq!(got, [3, 3, 3]);
        // None online: still one member each time, round-robin.
        let got = deliveries(&mut tree, "x", 8, |_| false);
        assert_eq!(got, [4, 1, 2, 3, 4, 1, 2, 3]);
    }

    #[test]
    fn shared_groups_are_per_name_and_filter() {
        let mut tree = Tree::new();
        tree.insert(&f("$share/g/a/+"), 1, qos(0));
        tree.insert(&f("$share/g/a/+"), 2, qos(0));
        tree.insert(&f("$share/h/a/+"), 3, qos(0));
        tree.insert(&f("$share/g/a/#"), 1, qos(0));
        tree.insert(&f("$share/g/a/b"), 4, qos(0));
        tree.insert(&f("$share/g/+/#"), 5, qos(0));
        assert_eq!(tree.len(), 6);
        let mut out = Vec::new();
        for round in 0..4 {
            tree.matches("a/b", all_online, &mut out);
            assert_eq!(out.len(), 5, "{out:?}");
            assert!(out.iter().all(|m| m.shared));
            let got: BTreeSet<_> = out.iter().map(|m| m.session).collect();
            let one_of_g = if round % 2 == 0 { 1 } else { 2 };
            assert!(
                got.is_superset(&BTreeSet::from([one_of_g, 3, 4, 5])),
                "{got:?}"
            );
        }
        // '$' topics are matched by shared filters under the same rule.
        assert_eq!(hits(&mut tree, "$a/b"), []);
    }

    #[test]
    fn shared_and_plain_subscriptions_of_one_session() {
        let mut tree = Tree::new();
        tree.insert(&f("a"), 1, qos(0));
        tree.insert(&f("$share/g/a"), 1, qos(1));
        tree.insert(&f("$share/g/a"), 2, qos(1));
        assert_eq!(tree.len(), 3);
        assert_eq!(hits(&mut tree, "a"), [(1, false), (1, true)]);
        assert_eq!(hits(&mut tree, "a"), [(1, false), (2, true)]);
        assert_eq!(tree.remove(&f("a"), 1), Some(qos(0)));
        assert_eq!(hits(&mut tree, "a"), [(1, true)]);
        assert_eq!(tree.remove(&f("$share/g/a"), 1), Some(qos(1)));
        assert_eq!(tree.remove(&f("$share/g/a"), 2), Some(qos(1)));
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn matches_clears_out_and_keeps_its_stack() {
        let mut tree = Tree::new();
        tree.insert(&f("a/+/c"), 1, qos(0));
        tree.insert(&f("a/b/+"), 1, qos(0));
        let mut out = Vec::new();
        tree.matches("a/b/c", all_online, &mut out);
        assert_eq!(out.len(), 2);
        tree.matches("x", all_online, &mut out);
        assert!(out.is_empty());
        // The walk stack kept its buffer, so matching does not allocate it again.
        assert!(tree.stack.is_empty());
        assert!(tree.stack.capacity() > 0);
    }

    #[test]
    fn very_deep_filters_do_not_overflow_the_stack() {
        let levels = 30_000;
        let plus = vec!["+"; levels].join("/");
        let lits = vec!["a"; levels].join("/");
        let mut tree = Tree::new();
        tree.insert(&f(&plus), 1, qos(0));
        tree.insert(&f(&format!("{lits}/#")), 2, qos(0));
        assert_eq!(hits(&mut tree, &lits), [(1, false), (2, false)]);
        assert_eq!(tree.remove(&f(&plus), 1), Some(qos(0)));
        assert_eq!(hits(&mut tree, &lits), [(2, false)]);
        // Dropping the tree frees the remaining deep path.
        drop(tree);
    }
}
