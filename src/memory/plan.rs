//! Residency plans: which blocks of a model stay on the device for a given budget.
//!
//! Every block runs once per forward, in order, so within a model there is no LRU: the plan is a fixed subset,
//! and each forward streams exactly `model − resident` bytes. A plan must also leave room for the one block in
//! flight (the *slot*: the largest streamed block, plus any dtype cast of a resident one), so
//! `resident + slot ≤ budget`.
//!
//! **Rule: largest blocks first, then first-fit by size.** It maximises resident bytes (so minimises the bytes
//! streamed per forward, the one cost we can state without timings), and every large block kept resident also
//! shrinks the slot the plan must reserve, which leaves more room for residency. In a UNet the largest blocks are
//! the attention/transformer blocks, whose transfer is the hardest to hide behind their compute. Ties keep file
//! order. The rank lives in [`rank`] so a measured-cost rule (transfer time vs hidable compute) can replace it.

use serde::Serialize;

/// What residency and streaming of one block cost on the device.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockCost {
    /// Bytes resident (storage dtype) — also the bytes a stream moves.
    pub bytes: u64,
    /// Extra bytes a fetch needs to cast the block to the compute dtype (0 when storage = compute).
    pub cast: u64,
}

impl BlockCost {
    /// Device bytes a fetch of this block holds when it is streamed.
    pub fn lease_streamed(&self) -> u64 {
        self.bytes + self.cast
    }
}

/// A residency plan for one model under one budget.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResidencyPlan {
    /// Per block (model order): kept resident?
    pub resident: Vec<bool>,
    /// Bytes kept resident.
    pub resident_bytes: u64,
    /// Bytes a fetch may hold beyond residency at once (largest streamed block, or largest cast).
    pub slot_bytes: u64,
    /// Bytes streamed by one forward (`model − resident`).
    pub streamed_bytes_per_forward: u64,
    /// The budget the plan was made for (resident + slot ≤ budget).
    pub budget_bytes: u64,
}

/// Blocks in the order the rule prefers them for residency (largest first, file order on ties).
pub fn rank(blocks: &[BlockCost]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].bytes.cmp(&blocks[a].bytes).then(a.cmp(&b)));
    order
}

fn finish(blocks: &[BlockCost], resident: Vec<bool>, budget: u64) -> ResidencyPlan {
    let total: u64 = blocks.iter().map(|b| b.bytes).sum();
    let resident_bytes: u64 = blocks
        .iter()
        .zip(&resident)
        .filter(|(_, r)| **r)
        .map(|(b, _)| b.bytes)
        .sum();
    let slot_bytes = blocks
        .iter()
        .zip(&resident)
        .map(|(b, r)| if *r { b.cast } else { b.lease_streamed() })
        .max()
        .unwrap_or(0);
    ResidencyPlan {
        resident,
        resident_bytes,
        slot_bytes,
        streamed_bytes_per_forward: total - resident_bytes,
        budget_bytes: budget,
    }
}

/// Everything streamed (nothing resident).
pub fn stream_all(blocks: &[BlockCost], budget: u64) -> ResidencyPlan {
    finish(blocks, vec![false; blocks.len()], budget)
}

/// Everything resident.
pub fn whole(blocks: &[BlockCost], budget: u64) -> ResidencyPlan {
    finish(blocks, vec![true; blocks.len()], budget)
}

/// Bytes the model needs on the device when whole: all blocks plus the largest cast.
pub fn whole_need(blocks: &[BlockCost]) -> u64 {
    blocks.iter().map(|b| b.bytes).sum::<u64>() + blocks.iter().map(|b| b.cast).max().unwrap_or(0)
}

/// Bytes the model needs at least to run at all (everything streamed: the largest lease).
pub fn min_need(blocks: &[BlockCost]) -> u64 {
    blocks.iter().map(|b| b.lease_streamed()).max().unwrap_or(0)
}

/// The partial plan for `budget` bytes (resident + slot ≤ budget), or None when not even streaming fits.
pub fn partial(blocks: &[BlockCost], budget: u64) -> Option<ResidencyPlan> {
    if min_need(blocks) > budget {
        return None;
    }
    if whole_need(blocks) <= budget {
        return Some(whole(blocks, budget));
    }
    let order = rank(blocks);
    // suffix[i] = largest streamed lease among order[i..]
    let mut suffix = vec![0u64; order.len() + 1];
    for i in (0..order.len()).rev() {
        suffix[i] = suffix[i + 1].max(blocks[order[i]].lease_streamed());
    }
    let mut resident = vec![false; blocks.len()];
    let (mut used, mut skipped_max, mut cast_max) = (0u64, 0u64, 0u64);
    for (pos, &i) in order.iter().enumerate() {
        let b = blocks[i];
        let slot_if = skipped_max.max(suffix[pos + 1]).max(cast_max).max(b.cast);
        if used + b.bytes + slot_if <= budget {
            resident[i] = true;
            used += b.bytes;
            cast_max = cast_max.max(b.cast);
        } else {
            skipped_max = skipped_max.max(b.lease_streamed());
        }
    }
    Some(finish(blocks, resident, budget))
}

/// Blocks to keep for an unlocked model given `budget` bytes of pure residency (no slot): the same rank, first-fit.
pub fn keep_within(blocks: &[BlockCost], budget: u64) -> Vec<bool> {
    let mut keep = vec![false; blocks.len()];
    let mut used = 0u64;
    for i in rank(blocks) {
        if used + blocks[i].bytes <= budget {
            keep[i] = true;
            used += blocks[i].bytes;
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(b: &[u64]) -> Vec<BlockCost> {
        b.iter()
            .map(|&bytes| BlockCost { bytes, cast: 0 })
            .collect()
    }

    #[test]
    fn plan_respects_budget_and_keeps_largest() {
        let c = costs(&[10, 40, 20, 30]);
        assert!(partial(&c, 39).is_none());
        let p = partial(&c, 40).unwrap();
        assert_eq!(p.resident_bytes, 0);
        assert_eq!(p.slot_bytes, 40);
        let p = partial(&c, 70).unwrap();
        assert_eq!(p.resident, vec![false, true, false, false]);
        assert_eq!(p.slot_bytes, 30);
        let p = partial(&c, 99).unwrap();
        assert_eq!(
            (p.resident_bytes, p.slot_bytes, p.streamed_bytes_per_forward),
            (70, 20, 30)
        );
        let p = partial(&c, 100).unwrap();
        assert_eq!((p.resident_bytes, p.slot_bytes), (100, 0));
        assert_eq!(partial(&c, 1000).unwrap().slot_bytes, 0);
    }
}
