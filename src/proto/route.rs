//! Which chunks of a push go where.
//!
//! An ordinary push sends every chunk down the whole chain and every replica stores all of it.
//! A *routed* push (epoch staging: each node wants only its shards) gives each replica its own
//! set of needed chunks; a chunk then travels only as far down the chain as the last replica
//! that needs it, and a replica that does not need a chunk forwards it without writing it.
//!
//! A node's [`Route`] answers two questions per chunk: is it stored *here*, and does it go
//! *onward* (some node after this one needs it). A chunk *arrives* at a replica when either is
//! true; the primary reads only the chunks that go onward. Every node derives its route from the
//! same per-node need sets, so all of them agree on which chunks travel each hop, in order.

use crate::manifest::Manifest;

/// A set of chunk numbers below a fixed total.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkSet {
    bits: Vec<u64>,
    total: u64,
}

impl ChunkSet {
    /// No chunk.
    pub(crate) fn empty(total: u64) -> Self {
        Self { bits: vec![0; total.div_ceil(64) as usize], total }
    }

    /// Every chunk.
    pub(crate) fn full(total: u64) -> Self {
        let mut s = Self::empty(total);
        s.insert_range(0, total);
        s
    }

    /// The chunks of the given manifest entries (directories have none).
    pub(crate) fn of_entries(manifest: &Manifest, entries: &[u32]) -> Self {
        let mut s = Self::empty(manifest.chunk_count());
        for &i in entries {
            let r = manifest.chunk_range(i as usize);
            s.insert_range(r.start, r.end);
        }
        s
    }

    /// Number of chunks the set ranges over.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    /// Adds chunks `start..end`.
    pub(crate) fn insert_range(&mut self, start: u64, end: u64) {
        for seq in start..end.min(self.total) {
            self.bits[(seq / 64) as usize] |= 1 << (seq % 64);
        }
    }

    /// Removes chunk `seq`.
    pub(crate) fn remove(&mut self, seq: u64) {
        if seq < self.total {
            self.bits[(seq / 64) as usize] &= !(1 << (seq % 64));
        }
    }

    /// Whether chunk `seq` is in the set.
    pub(crate) fn contains(&self, seq: u64) -> bool {
        seq < self.total && self.bits[(seq / 64) as usize] & (1 << (seq % 64)) != 0
    }

    /// Adds every chunk of `other`.
    pub(crate) fn union_with(&mut self, other: &ChunkSet) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Removes every chunk of the `(start, len)` ranges.
    pub(crate) fn remove_ranges(&mut self, ranges: &[(u64, u64)]) {
        for &(start, len) in ranges {
            for seq in start..start.saturating_add(len).min(self.total) {
                self.remove(seq);
            }
        }
    }

    /// Number of chunks in the set.
    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether the set is empty.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }
}

/// Each node's needed chunks, in chain order: those of the entries it wants (None: all of them)
/// less those it already holds (`haves`, when known: one list of ranges per node).
pub(crate) fn needs(manifest: &Manifest, wants: &[Option<Vec<u32>>], haves: &[Vec<(u64, u64)>]) -> Vec<ChunkSet> {
    wants
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut set = match w {
                None => ChunkSet::full(manifest.chunk_count()),
                Some(list) => ChunkSet::of_entries(manifest, list),
            };
            if let Some(h) = haves.get(i) {
                set.remove_ranges(h);
            }
            set
        })
        .collect()
}

/// One node's view of a push: which chunks it stores and which it passes on.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// None: every chunk, everywhere (an ordinary push).
    sets: Option<(ChunkSet, ChunkSet)>,
}

impl Route {
    /// Every chunk is stored everywhere and goes all the way down the chain.
    pub(crate) fn everything() -> Self {
        Self { sets: None }
    }

    /// The route of the node at `position` in a chain whose replicas need `needs` (first
    /// replica first): `position` 0 is the primary, 1 the first replica, and so on. `needs`
    /// empty means an ordinary push.
    pub(crate) fn for_position(needs: &[ChunkSet], position: usize) -> Self {
        let Some(first) = needs.first() else { return Self::everything() };
        let total = first.total();
        let here = if position == 0 { ChunkSet::empty(total) } else { needs[position - 1].clone() };
        let mut onward = ChunkSet::empty(total);
        for n in needs.iter().skip(position) {
            onward.union_with(n);
        }
        Self { sets: Some((here, onward)) }
    }

    /// Whether this is an ordinary push (everything everywhere).
    pub(crate) fn is_everything(&self) -> bool {
        self.sets.is_none()
    }

    /// Whether this node stores chunk `seq` (replicas; the primary stores nothing).
    pub(crate) fn here(&self, seq: u64) -> bool {
        self.sets.as_ref().is_none_or(|(h, _)| h.contains(seq))
    }

    /// Whether chunk `seq` goes on to the next node.
    pub(crate) fn onward(&self, seq: u64) -> bool {
        self.sets.as_ref().is_none_or(|(_, o)| o.contains(seq))
    }

    /// Whether chunk `seq` comes through this node (a replica receives it; the primary reads
    /// it).
    pub(crate) fn passes(&self, seq: u64) -> bool {
        self.here(seq) || self.onward(seq)
    }

    /// The first chunk at or after `seq` that passes this node (or `total`).
    pub(crate) fn next_passing(&self, mut seq: u64, total: u64) -> u64 {
        while seq < total && !self.passes(seq) {
            seq += 1;
        }
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(total: u64, seqs: &[u64]) -> ChunkSet {
        let mut s = ChunkSet::empty(total);
        for &q in seqs {
            s.insert_range(q, q + 1);
        }
        s
    }

    #[test]
    fn chunks_travel_only_as_far_as_the_last_node_that_needs_them() {
        // Chunk 0: r1 only. 1: r2 only. 2: r1 and r3. 3: nobody.
        let needs = [set(4, &[0, 2]), set(4, &[1]), set(4, &[2])];
        let p = Route::for_position(&needs, 0);
        assert_eq!((0..4).map(|s| p.onward(s)).collect::<Vec<_>>(), [true, true, true, false]);
        assert!(!p.here(0), "the primary stores nothing");
        let r1 = Route::for_position(&needs, 1);
        assert!(r1.here(0) && !r1.onward(0));
        assert!(!r1.here(1) && r1.onward(1), "relayed, not stored");
        assert!(r1.here(2) && r1.onward(2));
        assert!(!r1.passes(3));
        let r3 = Route::for_position(&needs, 3);
        assert_eq!(r3.next_passing(0, 4), 2);
        assert_eq!(r3.next_passing(3, 4), 4);
        assert!(!r3.onward(2), "the tail sends nothing on");
        let all = Route::for_position(&[], 2);
        assert!(all.is_everything() && all.here(3) && all.onward(3));
    }

    #[test]
    fn sets_count_and_combine() {
        let mut a = ChunkSet::full(130);
        assert_eq!(a.len(), 130);
        a.remove(129);
        a.remove(0);
        assert_eq!(a.len(), 128);
        assert!(!a.contains(129) && a.contains(64) && !a.contains(500));
        let mut e = ChunkSet::empty(130);
        assert!(e.is_empty());
        e.union_with(&a);
        assert_eq!(e, a);
    }
}
