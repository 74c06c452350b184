//! Exact tiled VAE decode: tiled equals untiled up to rounding, on a randomly initialised VAE built here (no fixture
//! needed), with the weight-fetching contract and the device working-memory figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use lowvram::models::{AutoencoderKL, VaeConfig};
use lowvram::{block_key, BlockWeights, ResidentWeights, WeightSource};

/// An SD-shaped VAE (4 stages, f = 8, mid attention), narrow enough for the CPU.
fn small_config(layers_per_block: usize) -> VaeConfig {
    VaeConfig::from_json(&format!(
        r#"{{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [16, 32, 32, 32], "layers_per_block": {layers_per_block},
            "norm_num_groups": 8, "latent_channels": 4, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}}"#
    ))
    .unwrap()
}

fn sd_config() -> VaeConfig {
    VaeConfig::from_json(
        r#"{"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
            "norm_num_groups": 32, "latent_channels": 4, "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap()
}

/// Random decoder weights for `cfg` under the diffusers names: convs and linears scaled by 1/√fan-in so the
/// activations stay O(1); norms with non-trivial scales and offsets.
fn random_decoder(cfg: &VaeConfig) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut conv = |name: &str, cout: usize, cin: usize, k: usize| {
        let std = 1.0 / ((cin * k * k) as f32).sqrt();
        t.insert(format!("{name}.weight"), Tensor::randn(0f32, std, (cout, cin, k, k), &dev).unwrap());
        t.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.1, cout, &dev).unwrap());
    };
    let ch = &cfg.block_out_channels;
    let (l, n, cm) = (cfg.latent_channels, ch.len(), ch[ch.len() - 1]);
    conv("post_quant_conv", l, l, 1);
    conv("decoder.conv_in", cm, l, 3);
    let mut resnets = vec![];
    for j in 0..2 {
        resnets.push((format!("decoder.mid_block.resnets.{j}"), cm, cm));
    }
    let mut prev = cm;
    for i in 0..n {
        let c = ch[n - 1 - i];
        for j in 0..cfg.layers_per_block + 1 {
            resnets.push((format!("decoder.up_blocks.{i}.resnets.{j}"), if j == 0 { prev } else { c }, c));
        }
        if i + 1 < n {
            conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), c, c, 3);
        }
        prev = c;
    }
    let mut norms = vec![("decoder.conv_norm_out".to_string(), ch[0]), ("decoder.mid_block.attentions.0.group_norm".into(), cm)];
    for (key, cin, cout) in &resnets {
        conv(&format!("{key}.conv1"), *cout, *cin, 3);
        conv(&format!("{key}.conv2"), *cout, *cout, 3);
        if cin != cout {
            conv(&format!("{key}.conv_shortcut"), *cout, *cin, 1);
        }
        norms.push((format!("{key}.norm1"), *cin));
        norms.push((format!("{key}.norm2"), *cout));
    }
    conv("decoder.conv_out", cfg.out_channels, ch[0], 3);
    for p in ["to_q", "to_k", "to_v", "to_out.0"] {
        let name = format!("decoder.mid_block.attentions.0.{p}");
        t.insert(format!("{name}.weight"), Tensor::randn(0f32, 1.0 / (cm as f32).sqrt(), (cm, cm), &dev).unwrap());
        t.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.1, cm, &dev).unwrap());
    }
    for (name, c) in norms {
        t.insert(format!("{name}.weight"), Tensor::randn(1f32, 0.2, c, &dev).unwrap());
        t.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.2, c, &dev).unwrap());
    }
    t
}

fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims());
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_device(a.device()).unwrap().to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    (d.max_all().unwrap().to_scalar::<f32>().unwrap(), d.mean_all().unwrap().to_scalar::<f32>().unwrap())
}

/// Latents with a non-zero mean and a spatial gradient, so tiles differ and norm statistics are not centred.
fn latents(shape: (usize, usize, usize, usize)) -> Tensor {
    let (_, _, h, w) = shape;
    let z = Tensor::randn(0.5f32, 1.0, shape, &Device::Cpu).unwrap();
    let ramp = Tensor::arange(0f32, (h * w) as f32, &Device::Cpu).unwrap().reshape((1, 1, h, w)).unwrap();
    z.broadcast_add(&(ramp / (h * w) as f64).unwrap()).unwrap()
}

#[test]
fn tiled_decode_equals_untiled() {
    for layers in [1, 2] {
        let cfg = small_config(layers);
        let w = ResidentWeights::from_tensors(random_decoder(&cfg), &Device::Cpu, DType::F32).unwrap();
        let m = AutoencoderKL::new(cfg).unwrap();
        for (shape, tile) in [
            ((1, 4, 24, 32), 8),
            ((1, 4, 24, 32), 12),
            ((1, 4, 19, 27), 8), // non-square, not divisible: partial tiles at the right and bottom
            ((1, 4, 19, 27), 5),
            ((2, 4, 24, 32), 12), // batch 2
            ((1, 4, 24, 32), 64), // one tile
        ] {
            if layers == 2 && shape != (1, 4, 19, 27) {
                continue; // the deeper model once, on the awkward shape
            }
            let z = latents(shape);
            let whole = m.decode(&w, &z).unwrap();
            let tiled = m.decode_tiled(&w, &z, tile).unwrap();
            assert_eq!(tiled.device().location(), Device::Cpu.location());
            let (max, mean) = diff(&tiled, &whole);
            let scale = whole.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            println!(
                "layers {layers}, latents {shape:?} → {:?}, tile {tile}: max abs {max:.3e}, mean abs {mean:.3e} (image max |x| {scale:.2})",
                whole.dims()
            );
            // The project's goal is mean ≤ 5e-3, max ≤ 5e-2; the tiled path is exact, so hold it to rounding.
            assert!(max <= 1e-4 && mean <= 1e-5, "tiled vs untiled: max {max} mean {mean}");
        }
    }
}

#[test]
fn tiled_decode_in_f16_is_close_to_untiled() {
    let cfg = small_config(1);
    let w = ResidentWeights::from_tensors(random_decoder(&cfg), &Device::Cpu, DType::F16).unwrap();
    let m = AutoencoderKL::new(cfg).unwrap();
    let z = latents((1, 4, 16, 24));
    let whole = m.decode(&w, &z).unwrap();
    let tiled = m.decode_tiled(&w, &z, 8).unwrap();
    assert_eq!(tiled.dtype(), DType::F16);
    let (max, mean) = diff(&tiled, &whole);
    println!("f16: max abs {max:.3e}, mean abs {mean:.3e}");
    assert!(max <= 5e-2 && mean <= 5e-3, "f16 tiled vs untiled: max {max} mean {mean}");
}

// ---- the fetch contract -------------------------------------------------------------------------------------

/// A WeightSource that records every fetch and how many BlockWeights were alive when it happened.
struct Recording {
    blocks: HashMap<String, HashMap<String, Tensor>>,
    live: Arc<AtomicUsize>,
    log: Mutex<Vec<(String, usize)>>,
}

struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WeightSource for Recording {
    fn fetch(&self, block: &str) -> lowvram::Result<BlockWeights> {
        let live = self.live.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push((block.to_string(), live));
        let t = self.blocks.get(block).cloned().unwrap_or_default();
        Ok(BlockWeights::new(block, t, Some(Box::new(Lease(self.live.clone())))))
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

#[test]
fn tiled_decode_fetches_every_block_once_and_releases_it() {
    let cfg = small_config(1);
    let tensors = random_decoder(&cfg);
    let expected: std::collections::BTreeSet<String> = tensors.keys().map(|n| block_key(n).to_string()).collect();
    let mut blocks: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (name, t) in tensors {
        let key = block_key(&name).to_string();
        blocks.entry(key.clone()).or_default().insert(name[key.len()..].trim_start_matches('.').to_string(), t);
    }
    let src = Recording { blocks, live: Arc::new(AtomicUsize::new(0)), log: Mutex::new(vec![]) };
    let m = AutoencoderKL::new(cfg).unwrap();
    m.decode_tiled(&src, &latents((1, 4, 12, 20)), 6).unwrap();
    let log = std::mem::take(&mut *src.log.lock().unwrap());
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, live) in &log {
        assert_eq!(*live, 0, "{k} fetched while another block's weights were still held");
        *counts.entry(k.as_str()).or_default() += 1;
    }
    println!("{} fetches for {} blocks over 2×4 tiles", log.len(), expected.len());
    let fetched: std::collections::BTreeSet<String> = counts.keys().map(|s| s.to_string()).collect();
    assert_eq!(fetched, expected);
    for (k, n) in counts {
        assert_eq!(n, 1, "{k} fetched {n} times");
    }
    assert_eq!(src.live.load(Ordering::SeqCst), 0);
}

// ---- device working memory ------------------------------------------------------------------------------------

#[test]
fn tiled_working_memory_is_set_by_the_tile() {
    let m = AutoencoderKL::new(sd_config()).unwrap();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    for dtype in [DType::F16, DType::F32] {
        for px in [512usize, 1024, 2048] {
            let z = [1, 4, px / 8, px / 8];
            let whole = m.decode_working_bytes(&z, dtype);
            let tiled: Vec<String> =
                [64usize, 32, 16].iter().map(|&t| format!("tile {t}: {:.0}", mib(m.decode_tiled_working_bytes(&z, t, dtype)))).collect();
            println!("SD VAE {dtype:?} {px}² decode: untiled {:.0} MiB; tiled {} MiB", mib(whole), tiled.join(", "));
        }
        // With tiles at least as large as the mid attention's needs, the figure does not depend on the image size.
        let t512 = m.decode_tiled_working_bytes(&[1, 4, 64, 64], 32, dtype);
        let t1024 = m.decode_tiled_working_bytes(&[1, 4, 128, 128], 32, dtype);
        assert_eq!(t512, t1024);
        assert!(t1024 < m.decode_working_bytes(&[1, 4, 128, 128], dtype) / 4);
    }
}
