//! Sharded checkpoints: a `*.safetensors.index.json` names the files a model's tensors are spread over (diffusers
//! and transformers write one when a model passes their shard size, as FLUX's transformer and T5-XXL do).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files behind `path`: the shards an `*.index.json` lists (in sorted order, each once), or `path` itself.
/// Shard names must be plain file names beside the index (no directories, no `..`).
pub fn shard_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !is_index(path) {
        return Ok(vec![path.to_path_buf()]);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(format!("{}: invalid shard index: {e}", path.display())))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(format!("{}: shard index without a \"weight_map\" object", path.display())))?;
    let mut names: Vec<&str> = Vec::with_capacity(map.len());
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(format!("{}: weight_map entry {tensor} is not a file name", path.display()))
        })?;
        let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file);
        if !plain || file == ".." || !file.ends_with(".safetensors") {
            return Err(Error::format(format!(
                "{}: weight_map entry {tensor} names \"{file}\", expected a .safetensors file beside the index",
                path.display()
            )));
        }
        names.push(file);
    }
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        return Err(Error::format(format!("{}: shard index lists no files", path.display())));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Every tensor's name and shape from the header(s) of a safetensors file or of the shards its index lists, without
/// reading tensor data (configs derived from shapes, key-layout detection).
pub fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let mut out = Vec::new();
    for file in shard_files(path)? {
        let mut f = std::fs::File::open(&file).map_err(|e| Error::io(&file, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(|e| Error::io(&file, e))?;
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            return Err(Error::format(format!("{}: safetensors header of {n} bytes", file.display())));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(&file, e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| Error::format(format!("{}: header: {e}", file.display())))?;
        let m = v.as_object().ok_or_else(|| Error::format(format!("{}: header is not an object", file.display())))?;
        for (k, t) in m.iter().filter(|(k, _)| *k != "__metadata__") {
            let shape = t
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| Error::format(format!("{}: tensor {k} has no valid shape", file.display())))?;
            out.push((k.clone(), shape));
        }
    }
    Ok(out)
}

/// Whether `path` names a shard index (`….safetensors.index.json`).
pub fn is_index(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".index.json"))
}

/// The weights file of a component folder: the first of `names` present, or its shard index
/// (`NAME.index.json`). None when neither exists.
pub fn find_weights(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|n| {
        let whole = dir.join(n);
        let index = dir.join(format!("{n}.index.json"));
        [whole, index].into_iter().find(|p| p.exists())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn an_index_lists_its_shards_once_in_order_and_rejects_paths() {
        let dir = std::env::temp_dir().join(format!("lowvram-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let idx = write(
            &dir,
            "m.safetensors.index.json",
            r#"{"metadata":{},"weight_map":{"a":"m-2.safetensors","b":"m-1.safetensors","c":"m-2.safetensors"}}"#,
        );
        assert_eq!(shard_files(&idx).unwrap(), vec![dir.join("m-1.safetensors"), dir.join("m-2.safetensors")]);
        for bad in [
            r#"{"weight_map":{"a":"../x.safetensors"}}"#,
            r#"{"weight_map":{"a":"/x.safetensors"}}"#,
            r#"{"weight_map":{}}"#,
            r#"{"x":1}"#,
            "nope",
        ] {
            let p = write(&dir, "bad.safetensors.index.json", bad);
            assert!(shard_files(&p).is_err(), "{bad}");
        }
        let single = dir.join("m.safetensors");
        assert_eq!(shard_files(&single).unwrap(), vec![single]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
