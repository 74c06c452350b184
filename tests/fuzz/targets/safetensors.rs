//! Target `safetensors`: the weight readers on one file — `WeightStore::open` (the header, offsets, dtypes and
//! block grouping a model load validates), its RAM copy and a streamed fetch of every block (the bytes a run
//! reads), and `ResidentWeights::load` (the unbudgeted reader).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device};
use lowvram::device::{DeviceAllocator, DeviceSpec};
use lowvram::weights::{ResidentWeights, StagingRing, WeightStore};
use serde_json::{json, Map, Value};

use crate::engine::{feature, havoc, mutate_json, Outcome, Rng, Target};

pub struct Safetensors {
    path: PathBuf,
    alloc: DeviceAllocator,
    ring: Arc<StagingRing>,
}

impl Safetensors {
    pub fn new(scratch: &std::path::Path) -> Self {
        Self {
            path: scratch.join("fuzz.safetensors"),
            // The emulated device: RAM copies are page-aligned arenas (pinned, under a cap) and reads without one go
            // through the staging ring, as on CUDA.
            alloc: emulated(),
            ring: StagingRing::new(2),
        }
    }
}

fn emulated() -> DeviceAllocator {
    let alloc = DeviceAllocator::new(&DeviceSpec::Emulated(1 << 30)).expect("emulated device");
    alloc.set_pinned_cap(Some(64 << 20));
    alloc
}

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2",
    "F4", "E8M0", "f32", "",
];
const NAMES: &[&str] = &[
    "conv_in.weight",
    "conv_in.bias",
    "down_blocks.0.resnets.0.conv1.weight",
    "down_blocks.0.resnets.0.norm1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "mid_block.resnets.0.conv1.weight",
    "decoder.up_blocks.0.resnets.0.conv1.weight",
    "time_embedding.linear_1.weight",
    "__metadata__",
    "",
    ".",
    "..",
    "a..b",
];

/// A safetensors file: 8-byte little-endian header length, the JSON header, the data.
pub fn encode(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn seed(tensors: &[(&str, &str, &[usize])]) -> Vec<u8> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut at = 0usize;
    let mut data = Vec::new();
    for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
        let size = match *dtype {
            "F32" => 4,
            "F16" | "BF16" => 2,
            "F64" | "I64" => 8,
            _ => 1,
        };
        let n = shape.iter().product::<usize>() * size;
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}),
        );
        data.extend((0..n).map(|j| (i * 31 + j * 7) as u8));
        at += n;
    }
    encode(&Value::Object(header), &data)
}

/// Split a file into its header and data, if the length prefix and JSON allow it.
fn decode(input: &[u8]) -> Option<(Value, &[u8])> {
    let n = u64::from_le_bytes(input.get(..8)?.try_into().ok()?) as usize;
    let header = serde_json::from_slice(input.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((header, &input[8 + n..]))
}

impl Target for Safetensors {
    fn name(&self) -> &'static str {
        "safetensors"
    }
    fn seeds(&mut self) -> Vec<Vec<u8>> {
        vec![
            seed(&[("conv_in.weight", "F32", &[2, 1, 3, 3]), ("conv_in.bias", "F32", &[2])]),
            seed(&[
                ("down_blocks.0.resnets.0.conv1.weight", "F16", &[4, 2, 1, 1]),
                ("down_blocks.0.resnets.0.conv1.bias", "BF16", &[4]),
                ("mid_block.attentions.0.to_q.weight", "F32", &[3, 3]),
                ("time_embedding.linear_1.weight", "F16", &[2, 2]),
            ]),
            seed(&[("scalar", "F32", &[]), ("empty", "F16", &[0, 4]), ("u8", "U8", &[3])]),
            seed(&[("decoder.up_blocks.0.resnets.0.norm1.weight", "F64", &[2])]),
            seed(&[]),
        ]
    }
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        if rng.one_in(2) {
            if let Some((mut header, data)) = decode(input) {
                let mut data = data.to_vec();
                match rng.below(6) {
                    0 => {
                        // a new tensor entry, often pointing into the existing data
                        if let Value::Object(m) = &mut header {
                            let a = rng.below(data.len() + 2);
                            let b = a + rng.below(64);
                            m.insert(
                                rng.pick(NAMES).to_string(),
                                json!({"dtype": rng.pick(DTYPES), "shape": [rng.below(5), rng.below(5)], "data_offsets": [a, b]}),
                            );
                        }
                    }
                    1 => data.truncate(rng.below(data.len() + 1)),
                    2 => data.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
                    _ => {
                        for _ in 0..1 + rng.below(3) {
                            mutate_json(&mut header, NAMES, DTYPES, rng, None);
                        }
                    }
                }
                let mut out = encode(&header, &data);
                if rng.one_in(8) {
                    // a header length that disagrees with the header
                    let n = u64::from_le_bytes(out[..8].try_into().unwrap());
                    let v = match rng.below(3) {
                        0 => n.wrapping_add(rng.below(16) as u64),
                        1 => n.wrapping_sub(rng.below(16) as u64),
                        _ => *rng.pick(crate::engine::INTERESTING),
                    };
                    out[..8].copy_from_slice(&v.to_le_bytes());
                }
                *input = out;
                return;
            }
        }
        havoc(
            input,
            corpus,
            &[
                "\"dtype\":",
                "\"shape\":",
                "\"data_offsets\":",
                "\"F16\"",
                "\"BF16\"",
                "[0,",
                "]",
                "}",
                "{",
            ],
            rng,
            64 << 10,
        );
    }
    fn run(&mut self, input: &[u8], _avoid_known: bool) -> Outcome {
        std::fs::write(&self.path, input).expect("write the scratch file");
        // the storage dtype a context may choose (config `storage_dtype`), and the compute dtype
        let storage = [None, Some(DType::F16), Some(DType::BF16), Some(DType::F32)][input.len() % 4];
        let compute = [DType::F32, DType::F16, DType::BF16][input.len() % 3];
        let mut seen = match WeightStore::open(&self.path, storage, compute) {
            Err(e) => feature("open", &e.to_string()),
            Ok(store) => {
                let mut s = String::from("open:ok");
                for b in 0..store.blocks().len() {
                    if let Err(e) = store.block_to_device(b, &self.alloc, &self.ring, compute) {
                        s.push_str(&feature("|fetch", &e.to_string()));
                    }
                }
                match store.load_ram_copy(&self.alloc, true) {
                    Ok(_) => {
                        for b in 0..store.blocks().len() {
                            if let Err(e) = store.block_to_device(b, &self.alloc, &self.ring, compute) {
                                s.push_str(&feature("|fetch-ram", &e.to_string()));
                            }
                        }
                    }
                    Err(e) => s.push_str(&feature("|ram", &e.to_string())),
                }
                s
            }
        };
        // Every arena the store pinned was unpinned before it was freed (the store is gone by now).
        assert_eq!(self.alloc.pin_violations(), 0, "a pinned arena was freed while registered");
        assert!(self.alloc.pinned_bytes() <= self.ring.bytes(), "pinned bytes left behind by a dropped store");
        match ResidentWeights::load(&self.path, &Device::Cpu, DType::F32) {
            Ok(_) => seen.push_str("|resident:ok"),
            Err(e) => seen.push_str(&feature("|resident", &e.to_string())),
        }
        Outcome::Seen(seen)
    }
}
