use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use shardserve_kernels::{QuantFormat, QuantMatrix};

use super::alignment;
use super::bytes::FileBytes;
use super::{Split, Weight, WeightsError};
use crate::progress::Tally;

/// The name, type and shape of one tensor in the file (shape in row-major
/// order: `[rows, cols]` for a matrix).
#[derive(Clone, Debug)]
pub struct TensorMeta {
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
}

/// An opened, checked GGUF file.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    map: FileBytes,
    /// Counts each tensor's stored bytes as a load goes through it, when set.
    tally: Option<Arc<Tally>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens `path` and checks it: GGUF magic, a header that parses, and
    /// every tensor's bytes inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| WeightsError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and model files are not rewritten while served;
        // a file truncated underneath us is the one case this cannot guard against.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, FileBytes::Mapped(map))
    }

    /// A GGUF file held in memory, checked as [`GgufFile::open`] checks a file;
    /// `name` stands for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, WeightsError> {
        Self::parse(name.into(), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, map: FileBytes) -> Result<Self, WeightsError> {
        if map.len() < 4 || &map[..4] != b"GGUF" {
            return Err(WeightsError::NotGguf {
                path,
                magic: map[..map.len().min(4)].to_vec(),
            });
        }
        if alignment::declared_alignment(&map) == Some(0) {
            return Err(WeightsError::BadHeader {
                path,
                reason: "general.alignment is 0: tensor data cannot be aligned to it".into(),
            });
        }
        // Read from the bytes already mapped: one pass, no system call per field.
        let content =
            Content::read(&mut Cursor::new(&*map)).map_err(|e| WeightsError::BadHeader {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        let gguf = Self {
            path,
            content,
            map,
            tally: None,
        };
        gguf.check_tensor_bounds()?;
        Ok(gguf)
    }

    /// Counts the load's progress in `tally`: every tensor's stored bytes are to do,
    /// and a load of any slice of a tensor does its bytes (each rank goes through
    /// the whole file, reading only its slices).
    pub fn count_into(&mut self, tally: Arc<Tally>) {
        tally.add_total(self.content.tensor_infos.values().map(stored_bytes).sum());
        self.tally = Some(tally);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.content.tensor_infos.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn tensor_meta(&self, name: &str) -> Result<TensorMeta, WeightsError> {
        let info = self.info(name)?;
        Ok(TensorMeta {
            dtype: info.ggml_dtype,
            dims: info.shape.dims().to_vec(),
        })
    }

    /// Loads `split` of tensor `name` onto `device`. Only the bytes of the
    /// slice are read; quantised tensors stay quantised.
    pub fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError> {
        let info = self.info(name)?;
        if let Some(tally) = &self.tally {
            tally.add_done(stored_bytes(info));
        }
        let dtype = info.ggml_dtype;
        let dims = info.shape.dims().to_vec();
        let (rows, cols) = match dims.as_slice() {
            [n] => (*n, 1),
            [r, c] => (*r, *c),
            _ => {
                return Err(WeightsError::BadSplit {
                    tensor: name.into(),
                    reason: format!("has shape {dims:?}; only vectors and matrices are used"),
                });
            }
        };
        let block = dtype.block_size();
        // A vector is stored as one row; its elements are what a split cuts.
        let (rows, cols, vector) = if dims.len() == 1 {
            (cols, rows, true)
        } else {
            (rows, cols, false)
        };
        let row_bytes = cols / block * dtype.type_size();
        let start = self.data_start(name)?;
        let bad = |reason: String| WeightsError::BadSplit {
            tensor: name.into(),
            reason,
        };
        let (out_rows, out_cols, bytes): (usize, usize, Cow<'_, [u8]>) = match (split, vector) {
            (Split::Full, _) => (
                rows,
                cols,
                Cow::Borrowed(&self.map[start..start + rows * row_bytes]),
            ),
            (Split::Rows(r), false) => {
                if r.start > r.end || r.end > rows {
                    return Err(bad(format!("rows {r:?} are outside its {rows} rows")));
                }
                let bytes = &self.map[start + r.start * row_bytes..start + r.end * row_bytes];
                (r.len(), cols, Cow::Borrowed(bytes))
            }
            (Split::Cols(c), _) | (Split::Rows(c), true) => {
                if c.start > c.end || c.end > cols {
                    return Err(bad(format!("columns {c:?} are outside its {cols} columns")));
                }
                if !c.start.is_multiple_of(block) || !c.end.is_multiple_of(block) {
                    return Err(bad(format!(
                        "columns {c:?} cut its {dtype:?} blocks of {block} values"
                    )));
                }
                let (b0, b1) = (
                    c.start / block * dtype.type_size(),
                    c.end / block * dtype.type_size(),
                );
                let mut out = Vec::with_capacity(rows * (b1 - b0));
                for r in 0..rows {
                    let row = start + r * row_bytes;
                    out.extend_from_slice(&self.map[row + b0..row + b1]);
                }
                (rows, c.len(), Cow::Owned(out))
            }
        };
        let shape: Vec<usize> = if vector {
            vec![out_cols]
        } else {
            vec![out_rows, out_cols]
        };
        let candle = |source| WeightsError::Candle {
            tensor: name.into(),
            source,
        };
        match dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let dt = match dtype {
                    GgmlDType::F32 => DType::F32,
                    GgmlDType::F16 => DType::F16,
                    _ => DType::BF16,
                };
                let t = Tensor::from_raw_buffer(&bytes, dt, &shape, device).map_err(candle)?;
                Ok(Weight::Dense(t))
            }
            _ if vector => Err(WeightsError::Unsupported {
                tensor: name.into(),
                dtype,
                usage: "a vector",
            }),
            _ => match (block_format(dtype), device) {
                (Some(format), Device::Cpu) => {
                    // Arranged for this CPU's kernels straight from the file's bytes.
                    let m = QuantMatrix::prepared(format, out_rows, out_cols, &bytes)
                        .map_err(|e| bad(e.to_string()))?;
                    Ok(Weight::Blocks(m))
                }
                _ => {
                    let storage = QStorage::from_data(bytes, device, dtype).map_err(candle)?;
                    let q = QTensor::new(storage, shape).map_err(candle)?;
                    Ok(Weight::Ggml(std::sync::Arc::new(q)))
                }
            },
        }
    }

    fn info(
        &self,
        name: &str,
    ) -> Result<&candle_core::quantized::gguf_file::TensorInfo, WeightsError> {
        self.content
            .tensor_infos
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor {
                path: self.path.clone(),
                name: name.into(),
            })
    }

    fn data_start(&self, name: &str) -> Result<usize, WeightsError> {
        let info = self.info(name)?;
        Ok((self.content.tensor_data_offset + info.offset) as usize)
    }

    fn check_tensor_bounds(&self) -> Result<(), WeightsError> {
        let file_len = self.map.len() as u64;
        for (name, info) in &self.content.tensor_infos {
            // A damaged header can claim dimensions whose product overflows.
            let dims = info.shape.dims();
            let Some(elems) = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)) else {
                return Err(WeightsError::BadHeader {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor '{name}' has dimensions {dims:?}, more values than fit in 64 bits"
                    ),
                });
            };
            // With no values its other dimensions are bounded by nothing, and the
            // kernels size a row from them.
            if dims.contains(&0) {
                return Err(WeightsError::BadHeader {
                    path: self.path.clone(),
                    reason: format!("tensor '{name}' has dimensions {dims:?}, so no values"),
                });
            }
            let block = info.ggml_dtype.block_size() as u64;
            // Blocks run along a row, as in ggml: the row length (the last dimension
            // here) must be whole blocks, or every row after the first would be misread.
            let row_len = dims.last().map_or(1, |&d| d as u64);
            if !row_len.is_multiple_of(block) {
                return Err(WeightsError::BadHeader {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor '{name}' has rows of {row_len} values, not a multiple of its {:?} block of {block}",
                        info.ggml_dtype
                    ),
                });
            }
            let Some(stored) = (elems / block).checked_mul(info.ggml_dtype.type_size() as u64)
            else {
                return Err(WeightsError::BadHeader {
                    path: self.path.clone(),
                    reason: format!(
                        "tensor '{name}' has dimensions {dims:?}, more bytes than fit in 64 bits"
                    ),
                });
            };
            let start = self.content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(stored);
            if end > file_len {
                return Err(WeightsError::Truncated {
                    path: self.path.clone(),
                    tensor: name.clone(),
                    start,
                    end,
                    file_len,
                });
            }
        }
        Ok(())
    }
}

/// A tensor's bytes in the file (its bounds were checked at open, so the product
/// cannot overflow).
fn stored_bytes(info: &candle_core::quantized::gguf_file::TensorInfo) -> u64 {
    let elems = info.shape.elem_count() as u64;
    elems / info.ggml_dtype.block_size() as u64 * info.ggml_dtype.type_size() as u64
}

/// The formats the project's own SIMD kernels multiply.
fn block_format(dtype: GgmlDType) -> Option<QuantFormat> {
    Some(match dtype {
        GgmlDType::Q4_0 => QuantFormat::Q4_0,
        GgmlDType::Q4_1 => QuantFormat::Q4_1,
        GgmlDType::Q5_0 => QuantFormat::Q5_0,
        GgmlDType::Q5_1 => QuantFormat::Q5_1,
        GgmlDType::Q8_0 => QuantFormat::Q8_0,
        _ => return None,
    })
}
