//! A slab of chunks, shared by the parker (parked connections) and the router (sessions).

/// A slab: values by value in chunks of [`CHUNK`] slots, each found by a key made of its slot's
/// index and the slot's generation, so that a key kept after its value left finds nothing, not
/// the value that took the slot. A value costs its slot and no allocation of its own (what many
/// small allocations made in a burst leave between them is docs/BENCHMARKS.md: idle
/// connections); a chunk whose values have all gone is freed.
pub(crate) struct Slots<T> {
    chunks: Vec<Option<Box<Chunk<T>>>>,
    /// Each slot's generation, kept while its chunk is freed.
    generations: Vec<u32>,
    free: Vec<u32>,
    len: usize,
}

/// Slots per chunk.
const CHUNK: usize = 64;

struct Chunk<T> {
    used: usize,
    slots: [Option<T>; CHUNK],
}

impl<T> Default for Slots<T> {
    fn default() -> Slots<T> {
        Slots {
            chunks: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

fn key(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(index)
}

fn index(key: u64) -> u32 {
    key as u32
}

impl<T> Slots<T> {
    /// The index and key of the slot [`Slots::fill`] fills next.
    pub(crate) fn vacant(&mut self) -> Option<(u32, u64)> {
        let index = match self.free.last() {
            Some(&i) => i,
            None => {
                let i = u32::try_from(self.generations.len())
                    .ok()
                    .filter(|i| *i < u32::MAX)?;
                // Generations start at 1, so that no key is 0.
                self.generations.push(1);
                self.free.push(i);
                i
            }
        };
        let generation = *self.generations.get(index as usize)?;
        Some((index, key(index, generation)))
    }

    /// Fills the slot [`Slots::vacant`] gave.
    pub(crate) fn fill(&mut self, index: u32, value: T) {
        let i = index as usize;
        if self.chunks.len() <= i / CHUNK {
            self.chunks.resize_with(i / CHUNK + 1, || None);
        }
        let chunk = self.chunks[i / CHUNK].get_or_insert_with(|| {
            Box::new(Chunk {
                used: 0,
                slots: std::array::from_fn(|_| None),
            })
        });
        self.free.pop();
        chunk.slots[i % CHUNK] = Some(value);
        chunk.used += 1;
        self.len += 1;
    }

    /// How many values it holds.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn get(&self, key: u64) -> Option<&T> {
        let i = index(key) as usize;
        if *self.generations.get(i)? != (key >> 32) as u32 {
            return None;
        }
        self.chunks.get(i / CHUNK)?.as_ref()?.slots[i % CHUNK].as_ref()
    }

    pub(crate) fn get_mut(&mut self, key: u64) -> Option<&mut T> {
        let i = index(key) as usize;
        if *self.generations.get(i)? != (key >> 32) as u32 {
            return None;
        }
        self.chunks.get_mut(i / CHUNK)?.as_mut()?.slots[i % CHUNK].as_mut()
    }

    /// Every value, by slot.
    pub(crate) fn values(&self) -> impl Iterator<Item = &T> {
        self.chunks
            .iter()
            .flatten()
            .flat_map(|c| c.slots.iter().flatten())
    }

    pub(crate) fn take(&mut self, key: u64) -> Option<T> {
        self.get(key)?;
        let i = index(key) as usize;
        let place = self.chunks.get_mut(i / CHUNK)?;
        let chunk = place.as_mut()?;
        let value = chunk.slots[i % CHUNK].take()?;
        chunk.used -= 1;
        if chunk.used == 0 {
            *place = None;
        }
        if let Some(g) = self.generations.get_mut(i) {
            *g = g.wrapping_add(1);
        }
        self.free.push(index(key));
        self.len -= 1;
        Some(value)
    }

    /// The key of the value in slot `index`, if one is there.
    pub(crate) fn key_at(&self, index: usize) -> Option<u64> {
        let generation = *self.generations.get(index)?;
        let index = u32::try_from(index).ok()?;
        let k = key(index, generation);
        self.get(k).map(|_| k)
    }

    pub(crate) fn keys(&self) -> Vec<u64> {
        (0..self.generations.len())
            .filter_map(|i| self.key_at(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_found_by_its_key_only_while_it_holds_its_value() {
        let mut slots: Slots<u32> = Slots::default();
        let mut keys = Vec::new();
        for n in 0..(2 * CHUNK as u32 + 3) {
            let (index, key) = slots.vacant().expect("room");
            slots.fill(index, n);
            keys.push(key);
        }
        assert_eq!(slots.len(), 2 * CHUNK + 3);
        assert_eq!(slots.get(keys[5]), Some(&5));
        assert_eq!(slots.key_at(5), Some(keys[5]));
        assert_eq!(slots.take(keys[5]), Some(5));
        assert_eq!(
            slots.get(keys[5]),
            None,
            "a key is not found once its value left"
        );
        assert_eq!(slots.take(keys[5]), None);
        // The slot is used again under another key; the old key still finds nothing.
        let (index, key) = slots.vacant().expect("room");
        assert_eq!(index, 5);
        assert_ne!(key, keys[5]);
        slots.fill(index, 500);
        assert_eq!(slots.get(keys[5]), None);
        assert_eq!(slots.get(key), Some(&500));
        // A chunk whose values have all left is freed, and made again when needed.
        for k in &keys[CHUNK..2 * CHUNK] {
            assert!(slots.take(*k).is_some());
        }
        assert!(slots.chunks[1].is_none());
        let (index, key) = slots.vacant().expect("room");
        assert_eq!(index as usize / CHUNK, 1);
        slots.fill(index, 7);
        assert_eq!(slots.get(key), Some(&7));
        assert_eq!(slots.keys().len(), CHUNK + 4);
    }
}
