//! The paged KV cache: keys and values of every layer live in fixed-size blocks of
//! `block_size` token slots; each sequence owns a block table mapping its positions to blocks, so
//! memory is handed out a block at a time and freed the moment a sequence ends.
//!
//! Prefix caching: once a block is full, it is registered under a hash chained over every token
//! of the sequence up to its end, so equal prefixes have equal hashes. A new sequence looks its
//! prompt's full blocks up and shares the ones found (reference-counted) instead of computing
//! them again. A block nobody holds keeps its contents and stays findable until the space is
//! needed; then the least recently used such block is reused.
//!
//! Isolation: a sequence's chain starts from the seed of its cache salt
//! ([`KvCache::namespace`]), so blocks are shared only between sequences with the same salt (the
//! router salts with the tenant). Another salt never finds them, nor learns from a faster first
//! token that they exist. The hash is SipHash keyed at random per cache, so a client cannot
//! compute block hashes offline to craft a colliding prompt.
//!
//! Integrity: a registered block carries a CRC32 of its keys and values (all layers). It is
//! checked before a cached block is shared and by a background sweep; a block that fails is
//! dropped from the cache and its sequences recompute it, and the corruption is counted.
//!
//! Layout per layer: `[block][kv_head][slot][head_dim]` f16, keys and values in separate arrays,
//! so one KV head's keys (or values) in a block are one contiguous run, which attention streams.
//! Half precision halves what attention reads per decoded token (at 16 streams of ~100 cached
//! tokens, the cache reads rival the weights), and doubles the tokens a memory budget holds.
//!
//! On an accelerator ([`KvCache::on_device`]) the keys and values live in device memory instead,
//! one `[layer][slot][kv_dim]` f16 tensor each (slot = block × block_size + offset), written and
//! read by the tensor forward pass; the bookkeeping above is the same, and checksums, swaps and
//! fault injection copy a block's rows of every layer to or from the host in one transfer each
//! for keys and values.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::EngineError;

/// Ran out of free blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the KV cache has no free blocks")]
pub struct OutOfBlocks;

pub struct KvCache {
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    kv_dim: usize,
    n_layer: usize,
    /// Host storage, per layer (empty when the cache is on a device).
    keys: Vec<Vec<f16>>,
    values: Vec<Vec<f16>>,
    /// Device storage, when the cache is on a device.
    tensors: Option<DeviceKv>,
    /// Blocks holding nothing worth keeping.
    free: Vec<u32>,
    refcount: Vec<u32>,
    /// The prefix hash of each registered block.
    hash: Vec<Option<u64>>,
    checksum: Vec<u32>,
    by_hash: HashMap<u64, u32>,
    /// Registered blocks nobody holds, by last use: reused oldest first.
    idle: BTreeMap<u64, u32>,
    last_used: Vec<u64>,
    clock: u64,
    sweep_cursor: usize,
    corruptions: u64,
    /// The secret key of the prefix hash, random per cache.
    hash_key: RandomState,
}

impl KvCache {
    /// A cache of `num_blocks` blocks of `block_size` slots for `n_layer` layers of `kv_heads`
    /// heads of `head_dim` values.
    pub fn new(n_layer: usize, kv_heads: usize, head_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        let per_layer = num_blocks * block_size * kv_heads * head_dim;
        let mut cache = Self::empty(n_layer, kv_heads, head_dim, block_size, num_blocks);
        cache.keys = (0..n_layer).map(|_| vec![f16::ZERO; per_layer]).collect();
        cache.values = (0..n_layer).map(|_| vec![f16::ZERO; per_layer]).collect();
        cache
    }

    /// The same cache with its keys and values in `device`'s memory, for the tensor forward pass.
    pub fn on_device(
        n_layer: usize,
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let mut cache = Self::empty(n_layer, kv_heads, head_dim, block_size, num_blocks);
        let shape = (n_layer, num_blocks * block_size, kv_heads * head_dim);
        let zeros = || Tensor::zeros(shape, DType::F16, device).map_err(device_error);
        cache.tensors = Some(DeviceKv { keys: zeros()?, values: zeros()? });
        Ok(cache)
    }

    fn empty(n_layer: usize, kv_heads: usize, head_dim: usize, block_size: usize, num_blocks: usize) -> Self {
        Self {
            block_size,
            kv_heads,
            head_dim,
            kv_dim: kv_heads * head_dim,
            n_layer,
            keys: Vec::new(),
            values: Vec::new(),
            tensors: None,
            // Pop from the end, so hand out low block numbers first.
            free: (0..num_blocks as u32).rev().collect(),
            refcount: vec![0; num_blocks],
            hash: vec![None; num_blocks],
            checksum: vec![0; num_blocks],
            by_hash: HashMap::new(),
            idle: BTreeMap::new(),
            last_used: vec![0; num_blocks],
            clock: 0,
            sweep_cursor: 0,
            corruptions: 0,
            hash_key: RandomState::new(),
        }
    }

    /// Blocks that fit in `bytes` for a model of this shape.
    pub fn blocks_for_budget(bytes: usize, n_layer: usize, kv_dim: usize, block_size: usize) -> usize {
        bytes / (2 * n_layer * block_size * kv_dim * std::mem::size_of::<f16>())
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The device storage, when the cache lives on a device.
    pub fn device_kv(&self) -> Option<&DeviceKv> {
        self.tensors.as_ref()
    }

    pub fn num_blocks(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks that can be handed out: empty ones plus cached ones nobody holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Registered blocks (held or idle) that later sequences can share.
    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// The chain seed of the prefix-cache namespace named by `salt`: sequences share cached
    /// blocks only with sequences of the same salt. The empty salt is the shared namespace, the
    /// seed of [`BlockTable::default`].
    pub fn namespace(&self, salt: &[u8]) -> u64 {
        if salt.is_empty() {
            return 0;
        }
        let mut h = self.hash_key.build_hasher();
        // Tagged, so a salt's seed is never the hash of some block.
        "cache-salt".hash(&mut h);
        salt.hash(&mut h);
        h.finish()
    }

    /// The hash of a block given the hash of the prefix before it.
    fn chain_hash(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hash_key.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// Cached blocks found corrupt so far.
    pub fn corruptions(&self) -> u64 {
        self.corruptions
    }

    fn allocate(&mut self) -> Result<u32, OutOfBlocks> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (&used, &b) = self.idle.iter().next().ok_or(OutOfBlocks)?;
                self.idle.remove(&used);
                self.unregister(b);
                b
            }
        };
        self.refcount[block as usize] = 1;
        Ok(block)
    }

    fn touch(&mut self, block: u32) {
        self.clock += 1;
        self.last_used[block as usize] = self.clock;
    }

    /// One more holder of a registered block.
    fn retain(&mut self, block: u32) {
        let b = block as usize;
        if self.refcount[b] == 0 {
            self.idle.remove(&self.last_used[b]);
        }
        self.refcount[b] += 1;
        self.touch(block);
    }

    /// One holder fewer; an unheld block stays cached if registered, else becomes free.
    fn release(&mut self, block: u32) {
        let b = block as usize;
        debug_assert!(self.refcount[b] > 0, "block {block} released more often than held");
        self.refcount[b] -= 1;
        if self.refcount[b] == 0 {
            if self.hash[b].is_some() {
                self.touch(block);
                self.idle.insert(self.last_used[b], block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Forgets a block's registration (its contents can no longer be shared).
    fn unregister(&mut self, block: u32) {
        if let Some(h) = self.hash[block as usize].take()
            && self.by_hash.get(&h) == Some(&block)
        {
            self.by_hash.remove(&h);
        }
    }

    /// Makes a full block findable under `hash`, with the checksum of its current contents.
    fn register(&mut self, block: u32, hash: u64) {
        if self.by_hash.contains_key(&hash) || self.hash[block as usize].is_some() {
            return;
        }
        self.checksum[block as usize] = self.crc(block);
        self.hash[block as usize] = Some(hash);
        self.by_hash.insert(hash, block);
    }

    /// A cached block with this prefix hash whose checksum still holds, now held by the caller.
    fn lookup(&mut self, hash: u64) -> Option<u32> {
        let block = *self.by_hash.get(&hash)?;
        if self.crc(block) != self.checksum[block as usize] {
            self.drop_corrupt(block);
            return None;
        }
        self.retain(block);
        Some(block)
    }

    fn drop_corrupt(&mut self, block: u32) {
        self.corruptions += 1;
        self.unregister(block);
        let b = block as usize;
        if self.refcount[b] == 0 {
            self.idle.remove(&self.last_used[b]);
            self.free.push(block);
        }
    }

    /// Checks up to `max_blocks` registered blocks (round robin) and drops those whose contents
    /// no longer match their checksum; returns them, so their holders can recompute.
    pub fn sweep(&mut self, max_blocks: usize) -> Vec<u32> {
        let n = self.num_blocks();
        let mut corrupt = Vec::new();
        let mut checked = 0;
        for _ in 0..n {
            if checked == max_blocks {
                break;
            }
            let block = self.sweep_cursor as u32;
            self.sweep_cursor = (self.sweep_cursor + 1) % n;
            if self.hash[block as usize].is_none() {
                continue;
            }
            checked += 1;
            if self.crc(block) != self.checksum[block as usize] {
                self.drop_corrupt(block);
                corrupt.push(block);
            }
        }
        corrupt
    }

    fn crc(&self, block: u32) -> u32 {
        let mut h = crc32fast::Hasher::new();
        match &self.tensors {
            None => {
                let range = self.block_range(block);
                for layer in self.keys.iter().chain(&self.values) {
                    h.update(bytemuck::cast_slice(&layer[range.clone()]));
                }
            }
            // A block that cannot be read back checks as corrupt (it is recomputed).
            Some(kv) => match kv.read_block(block, self.block_size) {
                Ok(data) => h.update(bytemuck::cast_slice(&data)),
                Err(e) => {
                    tracing::warn!(block, error = %e, "reading a KV block back from the device");
                    return h.finalize() ^ 1;
                }
            },
        }
        h.finalize()
    }

    /// Values one block holds over all layers, keys and values.
    pub fn block_values(&self) -> usize {
        2 * self.n_layer * self.block_size * self.kv_dim
    }

    /// A copy of a block's keys and values (all layers), for swapping it out to host memory.
    pub fn copy_out(&self, block: u32) -> Result<Vec<f16>, EngineError> {
        if let Some(kv) = &self.tensors {
            return kv.read_block(block, self.block_size);
        }
        let range = self.block_range(block);
        let mut out = Vec::with_capacity(self.block_values());
        for layer in self.keys.iter().chain(&self.values) {
            out.extend_from_slice(&layer[range.clone()]);
        }
        Ok(out)
    }

    /// Restores a block's keys and values from a [`copy_out`](Self::copy_out) copy.
    pub fn copy_in(&mut self, block: u32, data: &[f16]) -> Result<(), EngineError> {
        if let Some(kv) = &self.tensors {
            return kv.write_block(block, self.block_size, data);
        }
        let range = self.block_range(block);
        let n = range.len();
        for (layer, chunk) in self.keys.iter_mut().chain(self.values.iter_mut()).zip(data.chunks_exact(n)) {
            layer[range.clone()].copy_from_slice(chunk);
        }
        Ok(())
    }

    /// Counts a corruption found outside the cache (in swapped-out copies).
    pub fn record_corruption(&mut self) {
        self.corruptions += 1;
    }

    /// Fault injection for tests and drills: flips one bit of a cached block's stored keys.
    pub fn flip_bit(&mut self, block: u32, layer: usize) {
        let flip = |v: &mut f16| *v = f16::from_bits(v.to_bits() ^ 0x0200);
        if let Some(kv) = &self.tensors {
            // Keys of `layer` come first in the block's copy, its first value first.
            let at = layer * self.block_size * self.kv_dim;
            if let Ok(mut data) = kv.read_block(block, self.block_size) {
                flip(&mut data[at]);
                // Fault injection only: a failed write leaves the block intact.
                let _ = kv.write_block(block, self.block_size, &data);
            }
            return;
        }
        let at = self.block_range(block).start;
        flip(&mut self.keys[layer][at]);
    }

    /// Registered blocks, for fault injection.
    pub fn registered_blocks(&self) -> Vec<u32> {
        let mut blocks: Vec<u32> = self.by_hash.values().copied().collect();
        blocks.sort_unstable();
        blocks
    }

    /// Where a block's values start and end in a layer.
    fn block_range(&self, block: u32) -> std::ops::Range<usize> {
        let size = self.block_size * self.kv_dim;
        block as usize * size..(block as usize + 1) * size
    }

    /// Where KV head `head`'s rows of a block start in a layer.
    fn head_offset(&self, block: u32, head: usize) -> usize {
        self.block_range(block).start + head * self.block_size * self.head_dim
    }

    /// Stores the key and value (all KV heads) of one token, rounded to f16.
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, key: &[f32], value: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            let at = self.head_offset(block, h) + slot * hd;
            self.keys[layer][at..at + hd].convert_from_f32_slice(&key[h * hd..(h + 1) * hd]);
            self.values[layer][at..at + hd].convert_from_f32_slice(&value[h * hd..(h + 1) * hd]);
        }
    }

    /// One KV head's keys and values in one block of one layer: `block_size` rows of `head_dim`.
    pub fn head(&self, layer: usize, block: u32, head: usize) -> (&[f16], &[f16]) {
        let at = self.head_offset(block, head);
        let range = at..at + self.block_size * self.head_dim;
        (&self.keys[layer][range.clone()], &self.values[layer][range])
    }
}

/// The keys and values of a cache on a device: `[layer][slot][kv_dim]` f16 tensors.
pub struct DeviceKv {
    keys: Tensor,
    values: Tensor,
}

impl DeviceKv {
    /// Layer `layer`'s keys and values, `[slot][kv_dim]` views of the cache (writable in place).
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor), EngineError> {
        let view = |t: &Tensor| t.get(layer).map_err(device_error);
        Ok((view(&self.keys)?, view(&self.values)?))
    }

    /// A block's rows of every layer, keys then values, layer by layer.
    fn read_block(&self, block: u32, block_size: usize) -> Result<Vec<f16>, EngineError> {
        let start = block as usize * block_size;
        let read = |t: &Tensor| t.narrow(1, start, block_size)?.flatten_all()?.to_vec1::<f16>();
        let mut out = read(&self.keys).map_err(device_error)?;
        out.extend(read(&self.values).map_err(device_error)?);
        Ok(out)
    }

    /// Writes back what [`read_block`](Self::read_block) read.
    fn write_block(&self, block: u32, block_size: usize, data: &[f16]) -> Result<(), EngineError> {
        let start = block as usize * block_size;
        let (layers, _, width) = self.keys.dims3().map_err(device_error)?;
        if data.len() != 2 * layers * block_size * width {
            return Err(EngineError::Device(format!(
                "a copy of {} values for a block of {}",
                data.len(),
                2 * layers * block_size * width
            )));
        }
        let (keys, values) = data.split_at(data.len() / 2);
        for (t, chunk) in [(&self.keys, keys), (&self.values, values)] {
            let rows = Tensor::from_slice(chunk, (layers, block_size, width), t.device()).map_err(device_error)?;
            t.slice_set(&rows, 1, start).map_err(device_error)?;
        }
        Ok(())
    }
}

/// An error of the device (or of candle's tensor code running on it).
pub(crate) fn device_error(e: candle_core::Error) -> EngineError {
    EngineError::Device(e.to_string())
}

/// The blocks one sequence holds, in position order.
#[derive(Debug, Default, Clone)]
pub struct BlockTable {
    blocks: Vec<u32>,
    /// Leading blocks that are registered (or were found) in the prefix cache.
    hashed: usize,
    /// The prefix hash of the last of those (`seed` before the first).
    chain: u64,
    /// Where the chain starts: the sequence's cache namespace.
    seed: u64,
}

impl BlockTable {
    /// An empty table in the namespace `seed` (from [`KvCache::namespace`]); `default()` is the
    /// shared namespace.
    pub fn salted(seed: u64) -> Self {
        Self { blocks: Vec::new(), hashed: 0, chain: seed, seed }
    }

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

    /// Takes the longest cached prefix of `tokens` (whole blocks, always leaving at least one
    /// token to compute) into an empty table; returns how many tokens it covers.
    pub fn match_prefix(&mut self, cache: &mut KvCache, tokens: &[u32]) -> usize {
        debug_assert!(self.blocks.is_empty());
        let bs = cache.block_size();
        for chunk in tokens[..tokens.len().saturating_sub(1)].chunks_exact(bs) {
            let hash = cache.chain_hash(self.chain, chunk);
            let Some(block) = cache.lookup(hash) else { break };
            self.blocks.push(block);
            self.hashed += 1;
            self.chain = hash;
        }
        self.hashed * bs
    }

    /// Registers the blocks that `computed` tokens have filled, so later sequences can share them.
    pub fn register_full(&mut self, cache: &mut KvCache, tokens: &[u32], computed: usize) {
        let bs = cache.block_size();
        while self.hashed < (computed / bs).min(self.blocks.len()) {
            let hash = cache.chain_hash(self.chain, &tokens[self.hashed * bs..(self.hashed + 1) * bs]);
            cache.register(self.blocks[self.hashed], hash);
            self.hashed += 1;
            self.chain = hash;
        }
    }

    pub fn contains(&self, block: u32) -> bool {
        self.blocks.contains(&block)
    }

    /// Returns every block to the cache.
    pub fn release(&mut self, cache: &mut KvCache) {
        for block in self.blocks.drain(..) {
            cache.release(block);
        }
        self.hashed = 0;
        self.chain = self.seed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(cache: &mut KvCache, table: &BlockTable, tokens: usize, seed: f32) {
        for pos in 0..tokens {
            let v = [seed + pos as f32, 1.0];
            cache.write(0, table.blocks()[pos / 4], pos % 4, &v, &v);
        }
    }

    #[test]
    fn blocks_are_handed_out_as_needed_and_all_come_back() {
        let mut cache = KvCache::new(2, 1, 4, 16, 8);
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
        let mut cache = KvCache::new(1, 1, 2, 4, 4);
        let mut a = BlockTable::default();
        let mut b = BlockTable::default();
        a.reserve(&mut cache, 5).unwrap();
        b.reserve(&mut cache, 5).unwrap();
        for pos in 0..5 {
            let (ba, bb) = (a.blocks()[pos / 4], b.blocks()[pos / 4]);
            cache.write(0, ba, pos % 4, &[pos as f32, 1.0], &[0.0, pos as f32]);
            cache.write(0, bb, pos % 4, &[-(pos as f32), 2.0], &[0.0, 0.0]);
        }
        // Position 4: slot 0 of each table's second block.
        let f32s = |v: &[f16]| v[..2].iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (key, value) = cache.head(0, a.blocks()[1], 0);
        assert_eq!((f32s(key), f32s(value)), (vec![4.0, 1.0], vec![0.0, 4.0]));
        assert_eq!(f32s(cache.head(0, b.blocks()[1], 0).0), vec![-4.0, 2.0]);
    }

    #[test]
    fn a_shared_prefix_is_found_block_by_block_and_reference_counted() {
        let mut cache = KvCache::new(1, 1, 2, 4, 8);
        let tokens: Vec<u32> = (0..10).collect();
        let mut a = BlockTable::default();
        a.reserve(&mut cache, 10).unwrap();
        filled(&mut cache, &a, 10, 0.0);
        a.register_full(&mut cache, &tokens, 10);
        assert_eq!(cache.cached_blocks(), 2, "two full blocks of four");

        let mut b = BlockTable::default();
        assert_eq!(b.match_prefix(&mut cache, &tokens), 8);
        assert_eq!(&b.blocks()[..2], &a.blocks()[..2]);
        let mut other = tokens.clone();
        other[5] = 99;
        let mut c = BlockTable::default();
        assert_eq!(c.match_prefix(&mut cache, &other), 4, "the chain breaks at the first different block");

        // Held by a, b and c: releasing two keeps it cached and out of the free pool.
        let before = cache.free_blocks();
        a.release(&mut cache);
        b.release(&mut cache);
        assert_eq!(cache.cached_blocks(), 2);
        c.release(&mut cache);
        assert_eq!(cache.free_blocks(), before + 3, "a's three blocks come back, shared ones only once");
    }

    #[test]
    fn a_prefix_is_shared_only_within_its_salt() {
        let mut cache = KvCache::new(1, 1, 2, 4, 12);
        let tokens: Vec<u32> = (0..10).collect();
        let (acme, other) = (cache.namespace(b"acme"), cache.namespace(b"other"));
        let mut a = BlockTable::salted(acme);
        a.reserve(&mut cache, 10).unwrap();
        filled(&mut cache, &a, 10, 0.0);
        a.register_full(&mut cache, &tokens, 10);

        let mut b = BlockTable::salted(other);
        assert_eq!(b.match_prefix(&mut cache, &tokens), 0, "another salt finds nothing");
        assert_eq!(BlockTable::default().match_prefix(&mut cache, &tokens), 0, "nor does the shared namespace");
        let mut same = BlockTable::salted(acme);
        assert_eq!(same.match_prefix(&mut cache, &tokens), 8, "the same salt shares");
        assert_eq!(&same.blocks()[..2], &a.blocks()[..2]);

        // b computes the same prompt in blocks of its own; a's keys and values stay a's.
        b.reserve(&mut cache, 10).unwrap();
        assert!(b.blocks().iter().all(|blk| !a.contains(*blk)), "{:?} / {:?}", b.blocks(), a.blocks());
        filled(&mut cache, &b, 10, 100.0);
        b.register_full(&mut cache, &tokens, 10);
        assert_eq!(cache.cached_blocks(), 4, "one copy per namespace");
        assert_eq!(cache.head(0, a.blocks()[1], 0).0[0].to_f32(), 4.0);
        let mut b2 = BlockTable::salted(other);
        assert_eq!(b2.match_prefix(&mut cache, &tokens), 8);
        assert_eq!(cache.head(0, b2.blocks()[1], 0).0[0].to_f32(), 104.0, "b's own contents");

        // A released table starts its chain from its salt again.
        same.release(&mut cache);
        assert_eq!(same.match_prefix(&mut cache, &tokens), 8);
    }

    #[test]
    fn hashes_are_keyed_per_cache() {
        let (one, two) = (KvCache::new(1, 1, 2, 4, 4), KvCache::new(1, 1, 2, 4, 4));
        assert_eq!(one.namespace(b""), 0, "the empty salt is the shared namespace");
        assert_ne!(one.namespace(b"acme"), one.namespace(b"other"));
        assert_eq!(one.namespace(b"acme"), one.namespace(b"acme"));
        assert_ne!(one.namespace(b"acme"), two.namespace(b"acme"), "the key is random, not fixed");
        assert_ne!(one.chain_hash(0, &[1, 2, 3, 4]), two.chain_hash(0, &[1, 2, 3, 4]));
    }

    #[test]
    fn unheld_cached_blocks_are_reused_least_recently_used_first() {
        let mut cache = KvCache::new(1, 1, 2, 4, 3);
        let (t1, t2): (Vec<u32>, Vec<u32>) = ((0..5).collect(), (100..105).collect());
        for tokens in [&t1, &t2] {
            let mut t = BlockTable::default();
            t.reserve(&mut cache, 4).unwrap();
            filled(&mut cache, &t, 4, tokens[0] as f32);
            t.register_full(&mut cache, tokens, 4);
            t.release(&mut cache);
        }
        assert_eq!((cache.cached_blocks(), cache.free_blocks()), (2, 3));
        // Use t1's block again, then need two fresh blocks: t2's (older) goes first.
        let mut again = BlockTable::default();
        assert_eq!(again.match_prefix(&mut cache, &t1), 4);
        let mut fresh = BlockTable::default();
        fresh.reserve(&mut cache, 8).unwrap();
        let mut probe = BlockTable::default();
        assert_eq!(probe.match_prefix(&mut cache, &t2), 0, "t2's block was reused");
        again.release(&mut cache);
        assert_eq!(probe.match_prefix(&mut cache, &t1), 4, "t1's block survived");
    }

    #[test]
    fn a_corrupted_block_is_not_shared_and_the_sweep_finds_it() {
        let mut cache = KvCache::new(1, 1, 2, 4, 4);
        let tokens: Vec<u32> = (0..9).collect();
        let mut a = BlockTable::default();
        a.reserve(&mut cache, 9).unwrap();
        filled(&mut cache, &a, 9, 0.0);
        a.register_full(&mut cache, &tokens, 9);
        let (first, second) = (a.blocks()[0], a.blocks()[1]);
        cache.flip_bit(second, 0);
        let mut b = BlockTable::default();
        assert_eq!(b.match_prefix(&mut cache, &tokens), 4, "the corrupt second block is not shared");
        assert_eq!(cache.corruptions(), 1);
        cache.flip_bit(first, 0);
        assert_eq!(cache.sweep(10), vec![first]);
        assert_eq!(cache.corruptions(), 2);
        assert_eq!(cache.cached_blocks(), 0);
    }
}
