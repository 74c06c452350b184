//! `lowvram_tensor`: host tensors in and out.

use crate::ffi::backend::forward;
use std::ffi::c_void;

use crate::api::{HostDType, HostTensor};
use crate::error::{Error, Result};
use crate::ffi::boundary::{borrow, box_handle, free_box, guard, out_arg, Handle, OwnershipBox};
use crate::ffi::status::lowvram_status;

/// Most dimensions a tensor crossing the API may have.
pub const LOWVRAM_MAX_DIMS: usize = 8;

/// Element type of a tensor (stable numbers).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum lowvram_dtype {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

impl From<lowvram_dtype> for HostDType {
    fn from(d: lowvram_dtype) -> Self {
        match d {
            lowvram_dtype::F32 => HostDType::F32,
            lowvram_dtype::F16 => HostDType::F16,
            lowvram_dtype::Bf16 => HostDType::BF16,
        }
    }
}

impl From<HostDType> for lowvram_dtype {
    fn from(d: HostDType) -> Self {
        match d {
            HostDType::F32 => lowvram_dtype::F32,
            HostDType::F16 => lowvram_dtype::F16,
            HostDType::BF16 => lowvram_dtype::Bf16,
        }
    }
}

/// A tensor in host memory, owned by the library: contiguous, row-major. Opaque. Immutable once made, so a tensor
/// may be read from several threads at once. Ownership: one owner, the host, until `lowvram_tensor_free`.
#[allow(non_camel_case_types)]
pub struct lowvram_tensor {
    _private: [u8; 0],
}

impl Handle for lowvram_tensor {
    type Target = HostTensor;
    type Ownership = OwnershipBox;
}

/// Box a tensor into a new handle.
pub(crate) fn into_handle(t: HostTensor) -> *mut lowvram_tensor {
    box_handle(t)
}

/// Read a `(shape, ndim)` pair from C.
pub(crate) unsafe fn shape_arg(shape: *const i64, ndim: usize) -> Result<Vec<usize>> {
    if ndim == 0 || ndim > LOWVRAM_MAX_DIMS {
        return Err(Error::invalid(format!("ndim is {ndim}, must be 1..={LOWVRAM_MAX_DIMS}")));
    }
    if shape.is_null() {
        return Err(Error::NullArgument("shape"));
    }
    std::slice::from_raw_parts(shape, ndim)
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| Error::invalid(format!("shape has a negative dimension {d}"))))
        .collect()
}

/// Copy `data_len` bytes at `data` into a new tensor of `dtype` (a `lowvram_dtype` value) and `shape[0..ndim]` (row-major, native endianness).
/// `data_len` must equal the product of the shape times the element size (BUFFER_SIZE otherwise); `data` may be
/// NULL when that is 0 (a shape with a zero dimension). The library
/// copies the data; the caller keeps ownership of `data`. On success `*out` is a new handle owned by the caller
/// (free with `lowvram_tensor_free`). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_tensor_from_host(
    dtype: u32,
    shape: *const i64,
    ndim: usize,
    data: *const c_void,
    data_len: usize,
    out: *mut *mut lowvram_tensor,
) -> lowvram_status {
    forward!(lowvram_tensor_from_host(dtype, shape, ndim, data, data_len, out));
    guard(|| {
        let out = out_arg(out, "out")?;
        // Taken as a number: an out-of-range enum value from C would be undefined behaviour in Rust.
        let dtype = match dtype {
            0 => lowvram_dtype::F32,
            1 => lowvram_dtype::F16,
            2 => lowvram_dtype::Bf16,
            n => return Err(Error::invalid(format!("dtype {n} is not a lowvram_dtype (0 f32, 1 f16, 2 bf16)"))),
        };
        let shape = shape_arg(shape, ndim)?;
        // An empty tensor (a zero dimension) has no bytes: NULL data is fine there.
        let bytes: &[u8] = if data.is_null() && data_len == 0 {
            &[]
        } else if data.is_null() {
            return Err(Error::NullArgument("data"));
        } else {
            std::slice::from_raw_parts(data.cast::<u8>(), data_len)
        };
        *out = into_handle(HostTensor::from_bytes(dtype.into(), &shape, bytes)?);
        Ok(())
    })
}

/// Describe a tensor: its dtype, number of dimensions, and the dimensions into `shape[0..shape_cap]`
/// (`shape_cap` must be ≥ the tensor's ndim; `LOWVRAM_MAX_DIMS` always suffices), and its size in bytes.
/// Any out-pointer may be NULL if not wanted; all are written only on success. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_tensor_info(
    tensor: *const lowvram_tensor,
    out_dtype: *mut lowvram_dtype,
    out_shape: *mut i64,
    shape_cap: usize,
    out_ndim: *mut usize,
    out_byte_len: *mut usize,
) -> lowvram_status {
    forward!(lowvram_tensor_info(tensor, out_dtype, out_shape, shape_cap, out_ndim, out_byte_len));
    guard(|| {
        let t = borrow(tensor, "tensor")?;
        let dims = t.shape();
        if !out_shape.is_null() && shape_cap < dims.len() {
            return Err(Error::BufferSize(format!("shape_cap is {shape_cap}, the tensor has {} dims", dims.len())));
        }
        if let Some(d) = out_dtype.as_mut() {
            *d = t.dtype().into();
        }
        if !out_shape.is_null() {
            for (i, &d) in dims.iter().enumerate() {
                *out_shape.add(i) = d as i64;
            }
        }
        if let Some(n) = out_ndim.as_mut() {
            *n = dims.len();
        }
        if let Some(n) = out_byte_len.as_mut() {
            *n = t.byte_len();
        }
        Ok(())
    })
}

/// Copy the tensor's data into `buf`, which must be exactly the tensor's byte length (BUFFER_SIZE otherwise, with
/// both sizes in the message). The caller owns `buf`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_tensor_read(
    tensor: *const lowvram_tensor,
    buf: *mut c_void,
    buf_len: usize,
) -> lowvram_status {
    forward!(lowvram_tensor_read(tensor, buf, buf_len));
    guard(|| {
        let t = borrow(tensor, "tensor")?;
        if buf.is_null() {
            return Err(Error::NullArgument("buf"));
        }
        t.read_into(std::slice::from_raw_parts_mut(buf.cast::<u8>(), buf_len))
    })
}

/// Free a tensor made by the library. NULL is a no-op; freeing twice is undefined.
#[no_mangle]
pub unsafe extern "C" fn lowvram_tensor_free(tensor: *mut lowvram_tensor) {
    forward!(lowvram_tensor_free(tensor));
    guard(|| {
        free_box(tensor);
        Ok(())
    });
}

/// Write a decoded image tensor `[B, 3, H, W]` (values in [-1, 1], as `lowvram_vae_decode` returns them; clamped)
/// as 8-bit RGB PNG: one image to `path`, a batch to `NAME-0.png`, `NAME-1.png`, ... Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn lowvram_tensor_write_png(
    image: *const lowvram_tensor,
    path: *const std::ffi::c_char,
) -> lowvram_status {
    forward!(lowvram_tensor_write_png(image, path));
    guard(|| {
        let t = borrow(image, "image")?;
        let path = crate::ffi::boundary::str_arg(path, "path")?;
        crate::api::write_pngs(t.tensor(), std::path::Path::new(path)).map(|_| ())
    })
}
