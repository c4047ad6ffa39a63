//! The router's sessions: by id and by client id. A session's id is its key in a slab
//! ([`Slots`]), so an entry costs its slot; the index by client id holds bare ids, hashed by
//! their session's client id, so it costs 9 bytes a slot and no copy of the client id (the
//! figures are in docs/BENCHMARKS.md: idle connections).

use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;

use super::{SessionEntry, SessionId};
use crate::slots::Slots;

pub(super) struct Sessions {
    slots: Slots<SessionEntry>,
    by_client: HashTable<SessionId>,
    hasher: RandomState,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            slots: Slots::default(),
            by_client: HashTable::new(),
            hasher: RandomState::new(),
        }
    }
}

impl Sessions {
    pub(super) fn get(&self, id: SessionId) -> Option<&SessionEntry> {
        self.slots.get(id)
    }

    pub(super) fn get_mut(&mut self, id: SessionId) -> Option<&mut SessionEntry> {
        self.slots.get_mut(id)
    }

    /// The session of `client_id`, if there is one.
    pub(super) fn id_of(&self, client_id: &str) -> Option<SessionId> {
        let hash = self.hasher.hash_one(client_id);
        let slots = &self.slots;
        self.by_client
            .find(hash, |&id| {
                slots
                    .get(id)
                    .is_some_and(|e| &*e.handle.client_id == client_id)
            })
            .copied()
    }

    /// Adds a session made by `make` with the id it is given. Its client id must have no
    /// session (the caller ended the one it had). `None` if there is no room for another.
    pub(super) fn insert(
        &mut self,
        make: impl FnOnce(SessionId) -> SessionEntry,
    ) -> Option<SessionId> {
        let (index, id) = self.slots.vacant()?;
        let entry = make(id);
        let hash = self.hasher.hash_one(&*entry.handle.client_id);
        self.slots.fill(index, entry);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_client.insert_unique(hash, id, |&other| {
            slots
                .get(other)
                .map_or(0, |e| hasher.hash_one(&*e.handle.client_id))
        });
        Some(id)
    }

    pub(super) fn remove(&mut self, id: SessionId) -> Option<SessionEntry> {
        let entry = self.slots.get(id)?;
        let hash = self.hasher.hash_one(&*entry.handle.client_id);
        if let Ok(found) = self.by_client.find_entry(hash, |&other| other == id) {
            found.remove();
        }
        self.slots.take(id)
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &SessionEntry> {
        self.slots.values()
    }
}
