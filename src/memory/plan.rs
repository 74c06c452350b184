//! Residency plans: which blocks of a model stay on the device for a given budget.
//!
//! Every block runs once per forward, in order, so within a model there is no LRU: the plan is a fixed subset,
//! and each forward streams exactly `model − resident` bytes. A plan must also leave room for the blocks in
//! flight (the *slot*: the largest streamed block, or a resident one being placed — or, with prefetch, the
//! two largest, one being used while the next is copied), so `resident + slot ≤ budget`.
//!
//! **Rule: largest blocks first, then first-fit by size.** It maximises resident bytes (so minimises the bytes
//! streamed per forward, the one cost we can state without timings), and every large block kept resident also
//! shrinks the slot the plan must reserve, which leaves more room for residency. In a UNet the largest blocks are
//! the attention/transformer blocks, whose transfer is the hardest to hide behind their compute. Ties keep file
//! order. The rank lives in [`rank`] so a measured-cost rule (transfer time vs hidable compute) can replace it.

use serde::Serialize;

/// What residency and streaming of one block cost on the device. Weights are converted to the compute dtype once,
/// when they are placed (resident) or as they arrive (streamed), so a fetch never casts.
#[derive(Debug, Clone, Copy, Default)]
pub struct BlockCost {
    /// Bytes in the storage dtype: the RAM copy, and what one stream of the block reads and moves.
    pub bytes: u64,
    /// Device bytes while resident (the compute dtype).
    pub resident: u64,
    /// Device bytes a streamed fetch of the block holds (its compute-dtype tensors, plus the storage-dtype copy
    /// where the conversion runs on the device).
    pub lease: u64,
    /// Extra device bytes held while the block is placed resident (the storage-dtype copy a device-side conversion
    /// reads; 0 when the conversion runs on the host or storage = compute).
    pub place: u64,
}

impl BlockCost {
    /// A block whose storage and compute dtypes match: every cost is its bytes.
    pub fn same_dtype(bytes: u64) -> Self {
        Self {
            bytes,
            resident: bytes,
            lease: bytes,
            place: 0,
        }
    }
    /// Device bytes a fetch of this block holds when it is streamed.
    pub fn lease_streamed(&self) -> u64 {
        self.lease
    }
}

/// A residency plan for one model under one budget.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResidencyPlan {
    /// Per block (model order): kept resident?
    pub resident: Vec<bool>,
    /// Bytes kept resident.
    pub resident_bytes: u64,
    /// Bytes fetches may hold beyond residency at once: the `slots` largest streamed leases (or placements).
    pub slot_bytes: u64,
    /// Blocks that may be in flight at once: 1, or 2 when the next streamed block is prefetched.
    pub slots: usize,
    /// Bytes streamed by one forward (`model − resident`).
    pub streamed_bytes_per_forward: u64,
    /// The budget the plan was made for (resident + slot ≤ budget).
    pub budget_bytes: u64,
}

/// Blocks in the order the rule prefers them for residency (largest first, file order on ties).
pub fn rank(blocks: &[BlockCost]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    order.sort_by(|&a, &b| blocks[b].resident.cmp(&blocks[a].resident).then(a.cmp(&b)));
    order
}

/// The bytes `slots` fetches in flight may hold at once with this resident set: the sum of the `slots` largest
/// leases (a streamed block's lease, or a resident block's placement bytes).
pub fn slot_of(blocks: &[BlockCost], resident: &[bool], slots: usize) -> u64 {
    let mut top = vec![0u64; slots.max(1)];
    for (b, r) in blocks.iter().zip(resident) {
        let lease = if *r { b.place } else { b.lease_streamed() };
        if lease > top[top.len() - 1] {
            let at = top
                .iter()
                .position(|&t| lease > t)
                .expect("larger than the last");
            top.insert(at, lease);
            top.pop();
        }
    }
    top.iter().sum()
}

/// Device bytes of the resident set.
pub fn resident_bytes(blocks: &[BlockCost], resident: &[bool]) -> u64 {
    blocks
        .iter()
        .zip(resident)
        .filter(|(_, r)| **r)
        .map(|(b, _)| b.resident)
        .sum()
}

/// Storage bytes one forward streams with this resident set (every other block, once).
pub fn streamed_bytes(blocks: &[BlockCost], resident: &[bool]) -> u64 {
    blocks
        .iter()
        .zip(resident)
        .filter(|(_, r)| !**r)
        .map(|(b, _)| b.bytes)
        .sum()
}

fn finish(blocks: &[BlockCost], resident: Vec<bool>, budget: u64, slots: usize, holders: usize) -> ResidencyPlan {
    let resident_bytes = resident_bytes(blocks, &resident);
    let slots = if resident.iter().all(|r| *r) {
        1
    } else {
        slots.max(1)
    };
    ResidencyPlan {
        slot_bytes: slot_of(blocks, &resident, slots).saturating_mul(holders.max(1) as u64),
        slots,
        streamed_bytes_per_forward: streamed_bytes(blocks, &resident),
        resident,
        resident_bytes,
        budget_bytes: budget,
    }
}

/// Everything streamed (nothing resident), with `slots` blocks in flight.
pub fn stream_all(blocks: &[BlockCost], budget: u64, slots: usize) -> ResidencyPlan {
    stream_all_shared(blocks, budget, slots, 1)
}

/// [`stream_all`] for `holders` forwards of the model running at once (each with its own blocks in flight).
pub fn stream_all_shared(blocks: &[BlockCost], budget: u64, slots: usize, holders: usize) -> ResidencyPlan {
    finish(blocks, vec![false; blocks.len()], budget, slots, holders)
}

/// Everything resident.
pub fn whole(blocks: &[BlockCost], budget: u64) -> ResidencyPlan {
    finish(blocks, vec![true; blocks.len()], budget, 1, 1)
}

/// Bytes the model needs on the device when whole: all blocks resident plus the largest placement.
pub fn whole_need(blocks: &[BlockCost]) -> u64 {
    blocks
        .iter()
        .map(|b| b.resident)
        .fold(0u64, u64::saturating_add)
        + blocks.iter().map(|b| b.place).max().unwrap_or(0)
}

/// Bytes the model needs at least to run at all with `slots` blocks in flight (everything streamed).
pub fn min_need(blocks: &[BlockCost], slots: usize) -> u64 {
    min_need_shared(blocks, slots, 1)
}

/// [`min_need`] for `holders` forwards of the model running at once: each may hold the largest leases at the same
/// moment (two locks of one model streaming the same block), so the room for blocks in flight is multiplied.
pub fn min_need_shared(blocks: &[BlockCost], slots: usize, holders: usize) -> u64 {
    slot_of(blocks, &vec![false; blocks.len()], slots).saturating_mul(holders.max(1) as u64)
}

/// The partial plan for `budget` bytes with `slots` blocks in flight (resident + slot ≤ budget), or None when not
/// even streaming fits. Blocks are taken in [`rank`] order, each kept if it still fits beside the slot it leaves.
pub fn partial(blocks: &[BlockCost], budget: u64, slots: usize) -> Option<ResidencyPlan> {
    partial_shared(blocks, budget, slots, 1)
}

/// [`partial`] for `holders` forwards of the model running at once: one resident set, and `holders` times the
/// room for blocks in flight.
pub fn partial_shared(blocks: &[BlockCost], budget: u64, slots: usize, holders: usize) -> Option<ResidencyPlan> {
    let n = holders.max(1) as u64;
    if min_need_shared(blocks, slots, holders) > budget {
        return None;
    }
    if whole_need(blocks) <= budget {
        return Some(whole(blocks, budget));
    }
    let mut resident = vec![false; blocks.len()];
    let mut used = 0u64;
    for i in rank(blocks) {
        resident[i] = true;
        if used + blocks[i].resident + slot_of(blocks, &resident, slots).saturating_mul(n) <= budget {
            used += blocks[i].resident;
        } else {
            resident[i] = false;
        }
    }
    Some(finish(blocks, resident, budget, slots, holders))
}

/// Blocks to keep for an unlocked model given `budget` bytes of pure residency (no slot): the same rank, first-fit.
pub fn keep_within(blocks: &[BlockCost], budget: u64) -> Vec<bool> {
    let mut keep = vec![false; blocks.len()];
    let mut used = 0u64;
    for i in rank(blocks) {
        if used + blocks[i].resident <= budget {
            keep[i] = true;
            used += blocks[i].resident;
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(b: &[u64]) -> Vec<BlockCost> {
        b.iter()
            .map(|&bytes| BlockCost::same_dtype(bytes))
            .collect()
    }

    #[test]
    fn plan_respects_budget_and_keeps_largest() {
        let c = costs(&[10, 40, 20, 30]);
        assert!(partial(&c, 39, 1).is_none());
        let p = partial(&c, 40, 1).unwrap();
        assert_eq!(p.resident_bytes, 0);
        assert_eq!(p.slot_bytes, 40);
        let p = partial(&c, 70, 1).unwrap();
        assert_eq!(p.resident, vec![false, true, false, false]);
        assert_eq!(p.slot_bytes, 30);
        let p = partial(&c, 99, 1).unwrap();
        assert_eq!(
            (p.resident_bytes, p.slot_bytes, p.streamed_bytes_per_forward),
            (70, 20, 30)
        );
        let p = partial(&c, 100, 1).unwrap();
        assert_eq!((p.resident_bytes, p.slot_bytes), (100, 0));
        assert_eq!(partial(&c, 1000, 1).unwrap().slot_bytes, 0);
    }

    #[test]
    fn concurrent_holders_multiply_the_room_in_flight() {
        let c = costs(&[10, 40, 20, 30]);
        assert_eq!(min_need_shared(&c, 1, 2), 80);
        assert!(partial_shared(&c, 79, 1, 2).is_none());
        let p = partial_shared(&c, 80, 1, 2).unwrap();
        assert_eq!((p.resident_bytes, p.slot_bytes), (0, 80));
        // 40 resident leaves two holders streaming 30 each: 100 (the whole model, 105, does not fit).
        let c5 = costs(&[10, 40, 20, 30, 5]);
        let p = partial_shared(&c5, 100, 1, 2).unwrap();
        assert_eq!((p.resident, p.slot_bytes), (vec![false, true, false, false, false], 60));
        // One holder would have kept more.
        assert!(partial(&c5, 100, 1).unwrap().resident_bytes > 40);
        assert_eq!(stream_all_shared(&c, 200, 2, 3).slot_bytes, 210);
    }

    #[test]
    fn two_slots_reserve_the_two_largest_leases() {
        let c = costs(&[10, 40, 20, 30]);
        assert_eq!(min_need(&c, 2), 70);
        assert!(partial(&c, 69, 2).is_none());
        let p = partial(&c, 70, 2).unwrap();
        assert_eq!((p.resident_bytes, p.slot_bytes, p.slots), (0, 70, 2));
        // 40 resident leaves 30 + 20 in flight: 90.
        let p = partial(&c, 90, 2).unwrap();
        assert_eq!(p.resident, vec![false, true, false, false]);
        assert_eq!(p.slot_bytes, 50);
        let p = partial(&c, 100, 2).unwrap();
        assert_eq!((p.resident_bytes, p.slot_bytes, p.slots), (100, 0, 1));
        // Placements of resident blocks (a device-side conversion) count as leases too.
        let c = vec![
            BlockCost {
                bytes: 10,
                resident: 20,
                lease: 30,
                place: 5,
            },
            BlockCost {
                bytes: 8,
                resident: 16,
                lease: 24,
                place: 4,
            },
        ];
        assert_eq!(slot_of(&c, &[true, true], 2), 9);
        assert_eq!(slot_of(&c, &[false, true], 2), 34);
        assert_eq!(whole_need(&c), 41);
    }

    /// Converted-once blocks: residency costs the compute-dtype bytes, a stream moves the storage bytes.
    #[test]
    fn converted_blocks_cost_compute_bytes_resident_and_storage_bytes_streamed() {
        let c: Vec<BlockCost> = [10u64, 40, 20]
            .iter()
            .map(|&b| BlockCost {
                bytes: b,
                resident: 2 * b,
                lease: 2 * b,
                place: 0,
            })
            .collect();
        assert_eq!(whole_need(&c), 140);
        let p = partial(&c, 120, 1).unwrap();
        assert_eq!(p.resident, vec![false, true, false]);
        assert_eq!(
            (p.resident_bytes, p.slot_bytes, p.streamed_bytes_per_forward),
            (80, 40, 30)
        );
    }
}
