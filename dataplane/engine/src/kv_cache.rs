//! The paged KV cache: keys and values of every layer live in fixed-size blocks of
//! `block_size` token slots; each sequence owns a block table mapping its positions to blocks, so
//! memory is handed out a block at a time and freed the moment a sequence ends.
//!
//! Layout per layer: `[block][slot][kv_head * head_dim]` f32, keys and values in separate arrays.

/// Ran out of free blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache has no free blocks")]
pub struct OutOfBlocks;

pub struct KvCache {
    block_size: usize,
    kv_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    free: Vec<u32>,
}

impl KvCache {
    /// A cache of `num_blocks` blocks of `block_size` slots for `n_layer` layers of `kv_dim` floats.
    pub fn new(n_layer: usize, kv_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        let per_layer = num_blocks * block_size * kv_dim;
        Self {
            block_size,
            kv_dim,
            keys: (0..n_layer).map(|_| vec![0.0; per_layer]).collect(),
            values: (0..n_layer).map(|_| vec![0.0; per_layer]).collect(),
            // Pop from the end, so hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
        }
    }

    /// Blocks that fit in `bytes` for a model of this shape.
    pub fn blocks_for_budget(bytes: usize, n_layer: usize, kv_dim: usize, block_size: usize) -> usize {
        bytes / (2 * n_layer * block_size * kv_dim * std::mem::size_of::<f32>())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.keys.first().map_or(0, |k| k.len() / (self.block_size * self.kv_dim))
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    fn allocate(&mut self) -> Result<u32, OutOfBlocks> {
        self.free.pop().ok_or(OutOfBlocks)
    }

    /// Returns a block to the free list.
    fn release(&mut self, block: u32) {
        debug_assert!(!self.free.contains(&block), "block {block} freed twice");
        self.free.push(block);
    }

    fn offset(&self, block: u32, slot: usize) -> usize {
        (block as usize * self.block_size + slot) * self.kv_dim
    }

    /// Stores the key and value of one token.
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, key: &[f32], value: &[f32]) {
        let at = self.offset(block, slot);
        self.keys[layer][at..at + self.kv_dim].copy_from_slice(key);
        self.values[layer][at..at + self.kv_dim].copy_from_slice(value);
    }

    /// The key and value vectors (all KV heads) of position `pos` of a sequence.
    pub fn read(&self, layer: usize, table: &[u32], pos: usize) -> (&[f32], &[f32]) {
        let at = self.offset(table[pos / self.block_size], pos % self.block_size);
        (&self.keys[layer][at..at + self.kv_dim], &self.values[layer][at..at + self.kv_dim])
    }
}

/// The blocks one sequence holds, in position order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Grows the table to hold `tokens` positions. On failure nothing is allocated.
    pub fn reserve(&mut self, cache: &mut KvCache, tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = tokens.div_ceil(cache.block_size()).saturating_sub(self.blocks.len());
        if needed > cache.free_blocks() {
            return Err(OutOfBlocks);
        }
        for _ in 0..needed {
            self.blocks.push(cache.allocate()?);
        }
        Ok(())
    }

    /// Returns every block to the cache.
    pub fn release(&mut self, cache: &mut KvCache) {
        for block in self.blocks.drain(..) {
            cache.release(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_handed_out_as_needed_and_all_come_back() {
        let mut cache = KvCache::new(2, 4, 16, 8);
        let mut a = BlockTable::default();
        a.reserve(&mut cache, 1).unwrap();
        assert_eq!(a.blocks().len(), 1);
        a.reserve(&mut cache, 16).unwrap();
        assert_eq!(a.blocks().len(), 1, "16 tokens fit one block");
        a.reserve(&mut cache, 17).unwrap();
        assert_eq!(a.blocks().len(), 2);
        let mut b = BlockTable::default();
        assert_eq!(b.reserve(&mut cache, 16 * 7), Err(OutOfBlocks), "only 6 blocks left");
        assert_eq!(cache.free_blocks(), 6, "a failed reservation takes nothing");
        b.reserve(&mut cache, 16 * 6).unwrap();
        assert_eq!(cache.free_blocks(), 0);
        a.release(&mut cache);
        b.release(&mut cache);
        assert_eq!(cache.free_blocks(), 8);
    }

    #[test]
    fn writes_land_in_the_sequences_own_slots() {
        let mut cache = KvCache::new(1, 2, 4, 4);
        let mut a = BlockTable::default();
        let mut b = BlockTable::default();
        a.reserve(&mut cache, 5).unwrap();
        b.reserve(&mut cache, 5).unwrap();
        for pos in 0..5 {
            let (ba, bb) = (a.blocks()[pos / 4], b.blocks()[pos / 4]);
            cache.write(0, ba, pos % 4, &[pos as f32, 1.0], &[0.0, pos as f32]);
            cache.write(0, bb, pos % 4, &[-(pos as f32), 2.0], &[0.0, 0.0]);
        }
        assert_eq!(cache.read(0, a.blocks(), 4), (&[4.0, 1.0][..], &[0.0, 4.0][..]));
        assert_eq!(cache.read(0, b.blocks(), 4).0, &[-4.0, 2.0][..]);
    }
}
