//! Decoded images to PNG files.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// Write each image of a decoder output `[B, 3, H, W]` (values in [-1, 1], clamped) as an 8-bit RGB PNG.
/// One image goes to `path`; a batch goes to `stem-0.ext`, `stem-1.ext`, ... Returns the paths written.
pub fn write_pngs(image: &Tensor, path: &Path) -> Result<Vec<PathBuf>> {
    let (b, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(Error::invalid(format!("image has {c} channels, expected 3")));
    }
    // [-1, 1] → [0, 255], rounded like diffusers' numpy_to_pil ((x / 2 + 0.5).clamp(0, 1) * 255, round).
    let pixels = ((image.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .to_dtype(DType::U8)?;
    let mut written = Vec::with_capacity(b);
    for i in 0..b {
        let target = if b == 1 { path.to_path_buf() } else { numbered(path, i) };
        let data = pixels.get(i)?.flatten_all()?.to_vec1::<u8>()?;
        let file = std::fs::File::create(&target).map_err(|e| Error::io(&target, e))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| Error::io(&target, std::io::Error::other(e)))?;
        writer.write_image_data(&data).map_err(|e| Error::io(&target, std::io::Error::other(e)))?;
        writer.finish().map_err(|e| Error::io(&target, std::io::Error::other(e)))?;
        written.push(target);
    }
    Ok(written)
}

fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pngs_hold_the_clamped_rounded_pixels() {
        let dir = std::env::temp_dir().join(format!("lowvram-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // one 1x2 image: pixel 0 = (-1, 0, 1), pixel 1 = (2, -3, 0.5) → (0, 128, 255), (255, 0, 191)
        let v = [-1f32, 2.0, 0.0, -3.0, 1.0, 0.5];
        let img = Tensor::from_slice(&v, (1, 3, 1, 2), &Device::Cpu).unwrap();
        let paths = write_pngs(&img, &dir.join("a.png")).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&paths[0]).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(&buf[..6], &[0, 128, 255, 255, 0, 191]);
        let batch = Tensor::cat(&[&img, &img], 0).unwrap();
        let paths = write_pngs(&batch, &dir.join("b.png")).unwrap();
        assert_eq!(paths, vec![dir.join("b-0.png"), dir.join("b-1.png")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
