//! How a model's tensors may lie in files: split over shards (`*.safetensors.index.json`, as diffusers and
//! transformers write large models such as FLUX's transformer and T5-XXL) and assembled from byte ranges of several
//! stored tensors (a fused tensor read from its parts, halves swapped), all read in place through the public API.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use lowvram::api::{Context, ContextOptions, Tiling};
use lowvram::memory::ModelCache;
use lowvram::weights::{block_key, FilePart, TensorSpan, WeightLayout, WeightSource};
use safetensors::tensor::TensorView;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lowvram-layout-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Write f32 tensors to a safetensors file.
fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.to_string(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

/// Split a safetensors file into `n` shards beside an index, as `save_pretrained(max_shard_size=...)` does.
fn shard(src: &Path, dir: &Path, stem: &str, n: usize) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all = st.tensors();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let per = all.len().div_ceil(n);
    let mut map = serde_json::Map::new();
    for (i, chunk) in all.chunks(per).enumerate() {
        let file = format!("{stem}-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in chunk {
            map.insert(name.clone(), file.clone().into());
        }
        safetensors::tensor::serialize_to_file(chunk.to_vec(), None, &dir.join(&file)).unwrap();
    }
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    std::fs::write(&index, serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    index
}

fn cpu_cache() -> ModelCache {
    let mut c = lowvram::config::Config::default();
    c.set("device", "cpu").unwrap();
    ModelCache::new(c).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A span made of several parts reads their bytes concatenated in order (rows of two tensors; the halves of one
/// tensor swapped), and spans that do not add up to their shape are refused with the tensor named.
#[test]
fn spans_concatenate_their_parts_in_order() {
    let dir = temp_dir("parts");
    let file = dir.join("m.safetensors");
    let a: Vec<f32> = (0..6).map(|i| i as f32).collect(); // [2, 3]
    let b: Vec<f32> = vec![10., 11., 12.]; // [1, 3]
    write(&file, &[("blk.a", vec![2, 3], a.clone()), ("blk.b", vec![1, 3], b.clone())]);
    let st_bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let range = |n: &str| {
        let v = st.tensor(n).unwrap();
        let start = v.data().as_ptr() as usize - st_bytes.as_ptr() as usize;
        start..start + v.data().len()
    };
    let (ra, rb) = (range("blk.a"), range("blk.b"));
    let row = 12; // bytes of one [3] f32 row
    let spans = vec![
        TensorSpan {
            name: "blk.ba".into(),
            dtype: candle_core::DType::F32,
            shape: vec![3, 3],
            parts: vec![FilePart::of(rb.clone()), FilePart::of(ra.clone())],
            transposed: false,
        },
        TensorSpan {
            name: "blk.swapped".into(),
            dtype: candle_core::DType::F32,
            shape: vec![2, 3],
            parts: vec![FilePart::of(ra.start + row..ra.end), FilePart::of(ra.start..ra.start + row)],
            transposed: false,
        },
    ];
    let layout = WeightLayout { view: "parts".into(), rule: block_key, spans: Some(std::sync::Arc::new(spans)) };
    let cache = cpu_cache();
    let m = cache.load_model_as(&file, "parts", &layout).unwrap();
    let lock = cache.lock(&m, 0).unwrap();
    let w = lock.fetch("blk").unwrap();
    let ba = w.get_shaped("ba", &[3, 3]).unwrap();
    assert_eq!(values(&ba), [b.clone(), a.clone()].concat());
    let swapped = w.get_shaped("swapped", &[2, 3]).unwrap();
    assert_eq!(values(&swapped), [a[3..].to_vec(), a[..3].to_vec()].concat());
    drop((w, lock, m));

    for (tag, parts) in [
        ("short", vec![FilePart::of(rb.clone())]),
        ("outside", vec![FilePart::of(rb.clone()), FilePart::of(ra.start..st_bytes.len() + 12)]),
        ("no-such-file", vec![FilePart::of(rb.clone()), FilePart { file: 1, bytes: ra.clone() }]),
        ("empty", vec![]),
    ] {
        let bad = TensorSpan {
            name: "blk.bad".into(),
            dtype: candle_core::DType::F32,
            shape: vec![3, 3],
            parts,
            transposed: false,
        };
        let layout = WeightLayout { view: tag.into(), rule: block_key, spans: Some(std::sync::Arc::new(vec![bad])) };
        let err = cache.load_model_as(&file, tag, &layout).err().expect("refused").to_string();
        assert!(err.contains("blk.bad"), "{tag}: {err}");
    }
}

/// A component folder whose weights are sharded loads through its index and decodes bit-identically to the
/// unsharded folder, whether its blocks stay resident or stream through a tight device.
#[test]
fn a_sharded_folder_loads_and_runs_like_the_whole_file() {
    let src = repo().join("tests/fixtures/tiny-sd-random/vae");
    let dir = temp_dir("sharded");
    let vae = dir.join("vae");
    std::fs::create_dir_all(&vae).unwrap();
    std::fs::copy(src.join("config.json"), vae.join("config.json")).unwrap();
    let index = shard(&src.join("diffusion_pytorch_model.safetensors"), &vae, "diffusion_pytorch_model", 3);
    assert_eq!(lowvram::weights::shard_files(&index).unwrap().len(), 3);

    let latents = Tensor::randn(0f32, 1f32, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let run = |folder: &Path, device: &str| {
        // `vram_state: none` streams every block through the device on each use.
        let yaml = if device == "cpu" { "" } else { "device_working_mem_gb: 0.01\nvram_state: none" };
        let ctx = Context::new(ContextOptions {
            device: Some(device.into()),
            config_yaml: Some(yaml.into()),
            ..Default::default()
        })
        .unwrap();
        let model = ctx.load_model(folder).unwrap();
        let (image, report) = ctx.vae_decode(&model, &latents, Tiling::Never).unwrap();
        if device != "cpu" {
            assert!(report.bytes_streamed > 0, "{report:?}");
        }
        values(&image)
    };
    let whole = run(&src, "cpu");
    assert_eq!(run(&vae, "cpu"), whole, "sharded, resident");
    assert_eq!(run(&vae, "emulated:24MiB"), whole, "sharded, streamed");

    // A shard listed by the index but missing is an I/O error naming it.
    let missing = vae.join("diffusion_pytorch_model-00002-of-00003.safetensors");
    std::fs::remove_file(&missing).unwrap();
    let ctx = Context::new(ContextOptions { device: Some("cpu".into()), ..Default::default() }).unwrap();
    let err = ctx.load_model(&vae).err().expect("refused").to_string();
    assert!(err.contains("00002-of-00003"), "{err}");
}
