//! GGUF model files: parsed with candle's reader, tensor data read in place from a memory map
//! (the host-RAM tier of the weight cache: pages are shared with the OS page cache and can be
//! locked in memory).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};

use crate::EngineError;
use crate::quant::{QMatrix, WeightType};

/// A cheap, clonable view of bytes from a mapped file or an owned buffer.
#[derive(Clone)]
pub struct Bytes {
    backing: Arc<Backing>,
    start: usize,
    len: usize,
}

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Self { backing: Arc::new(Backing::Owned(v)), start: 0, len }
    }

    fn slice(&self, start: usize, len: usize) -> Self {
        Self { backing: self.backing.clone(), start: self.start + start, len }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &*self.backing {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        };
        &all[self.start..self.start + self.len]
    }
}

/// An open GGUF file: metadata and in-place tensors.
pub struct GgufFile {
    bytes: Bytes,
    content: Content,
}

impl GgufFile {
    /// Maps and parses `path`. A truncated or corrupt file is an error, never a panic.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::Io(format!("{}: {e}", path.display())))?;
        // SAFETY: the mapping is read-only. Model files are written once and published by atomic
        // rename (see the weight cache), so a mapped file is never modified underneath us.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| EngineError::Io(format!("mapping {}: {e}", path.display())))?;
        let len = map.len();
        Self::parse(Bytes { backing: Arc::new(Backing::Mapped(map)), start: 0, len })
    }

    /// Parses GGUF from bytes already in memory.
    pub fn parse(bytes: Bytes) -> Result<Self, EngineError> {
        check_header(&bytes)?;
        // candle's reader trusts the lengths it reads; the header check above rejects files that
        // are not GGUF at all, and a panic on a corrupt length is turned into an error here.
        let parsed = std::panic::catch_unwind(|| Content::read(&mut Cursor::new(&bytes[..])));
        let content = match parsed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(EngineError::InvalidModel(format!("corrupt GGUF: {e}"))),
            Err(_) => return Err(EngineError::InvalidModel("corrupt GGUF: unreadable header".into())),
        };
        for (name, info) in &content.tensor_infos {
            let size = tensor_size(info.ggml_dtype, info.shape.elem_count());
            let end = content.tensor_data_offset.checked_add(info.offset).and_then(|s| s.checked_add(size as u64));
            if end.is_none_or(|end| end > bytes.len() as u64) {
                return Err(EngineError::InvalidModel(format!(
                    "truncated GGUF: tensor {name} ends past the end of the file ({} bytes)",
                    bytes.len()
                )));
            }
        }
        Ok(Self { bytes, content })
    }

    /// Locks the mapped weights in RAM (`mlock`) so they are never paged out: the pinned
    /// host-memory tier. Needs CAP_IPC_LOCK or a large enough memlock limit.
    pub fn lock_in_memory(&self) -> Result<(), EngineError> {
        match &*self.bytes.backing {
            Backing::Mapped(map) => map.lock().map_err(|e| {
                EngineError::Io(format!(
                    "locking the weights in memory: {e} (grant CAP_IPC_LOCK, raise the memlock limit, or turn pinInHostMemory off)"
                ))
            }),
            Backing::Owned(_) => Ok(()),
        }
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn value(&self, key: &str) -> Result<&Value, EngineError> {
        self.content.metadata.get(key).ok_or_else(|| EngineError::InvalidModel(format!("metadata {key} is missing")))
    }

    pub fn u32(&self, key: &str) -> Result<u32, EngineError> {
        self.value(key)?.to_u32().map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))
    }

    pub fn f32(&self, key: &str) -> Result<f32, EngineError> {
        self.value(key)?.to_f32().map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))
    }

    pub fn string(&self, key: &str) -> Result<&str, EngineError> {
        self.value(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))
    }

    pub fn strings(&self, key: &str) -> Result<Vec<&str>, EngineError> {
        let values =
            self.value(key)?.to_vec().map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))?;
        values
            .iter()
            .map(|v| v.to_string().map(String::as_str))
            .collect::<Result<_, _>>()
            .map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))
    }

    pub fn i32s(&self, key: &str) -> Result<Vec<i32>, EngineError> {
        let values =
            self.value(key)?.to_vec().map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))?;
        values
            .iter()
            .map(|v| v.to_i32())
            .collect::<Result<_, _>>()
            .map_err(|e| EngineError::InvalidModel(format!("metadata {key}: {e}")))
    }

    /// Shape (outermost dimension first) and raw bytes of a tensor.
    fn raw(&self, name: &str) -> Result<(GgmlDType, Vec<usize>, Bytes), EngineError> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("tensor {name} is missing")))?;
        let dims = info.shape.dims().to_vec();
        let size = tensor_size(info.ggml_dtype, info.shape.elem_count());
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        Ok((info.ggml_dtype, dims, self.bytes.slice(start, size)))
    }

    /// A 1-D f32 tensor (norm weights).
    pub fn vector(&self, name: &str) -> Result<Vec<f32>, EngineError> {
        let (dtype, _, bytes) = self.raw(name)?;
        if dtype != GgmlDType::F32 {
            return Err(EngineError::InvalidModel(format!("tensor {name} is {dtype:?}, expected F32")));
        }
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor as candle's quantized tensor on `device` (copied there), for the tensor forward
    /// pass.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<Arc<QTensor>, EngineError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        qtensor_from_ggml(dtype, &bytes, dims, device)
            .map(Arc::new)
            .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))
    }

    /// A 2-D quantized weight matrix (`rows` outputs × `cols` inputs).
    pub fn matrix(&self, name: &str) -> Result<QMatrix, EngineError> {
        let (dtype, dims, bytes) = self.raw(name)?;
        let wtype = match dtype {
            GgmlDType::Q4_1 => WeightType::Q4_1,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            other => {
                return Err(EngineError::InvalidModel(format!(
                    "tensor {name} is {other:?}; this engine runs Q4_1 and Q8_0 weights"
                )));
            }
        };
        // candle lists dimensions outermost first: (output rows, input columns).
        let [rows, cols] = dims[..] else {
            return Err(EngineError::InvalidModel(format!("tensor {name} has shape {dims:?}, expected 2-D")));
        };
        if cols % crate::quant::BLOCK != 0 {
            return Err(EngineError::InvalidModel(format!("tensor {name}: {cols} columns is not a multiple of 32")));
        }
        Ok(QMatrix::new(wtype, rows, cols, bytes))
    }
}

fn tensor_size(dtype: GgmlDType, elements: usize) -> usize {
    elements / dtype.block_size() * dtype.type_size()
}

/// Rejects anything that is not a GGUF v2/v3 file with plausible counts, before the full parse.
fn check_header(bytes: &[u8]) -> Result<(), EngineError> {
    if bytes.len() < 24 || &bytes[..4] != b"GGUF" {
        return Err(EngineError::InvalidModel("not a GGUF file (bad magic)".into()));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if !(2..=3).contains(&version) {
        return Err(EngineError::InvalidModel(format!("unsupported GGUF version {version}")));
    }
    let count = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let (tensors, kvs) = (count(8), count(16));
    // Every tensor info and key-value pair takes well over 8 bytes of header.
    if tensors > bytes.len() as u64 / 8 || kvs > bytes.len() as u64 / 8 {
        return Err(EngineError::InvalidModel(format!(
            "corrupt GGUF: {tensors} tensors and {kvs} keys in a file of {} bytes",
            bytes.len()
        )));
    }
    Ok(())
}
