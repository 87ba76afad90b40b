//! A directory of safetensors files (one `model.safetensors`, or shards
//! listed by `model.safetensors.index.json`), memory-mapped. Headers are
//! checked when the directory is opened; a load copies only the bytes of the
//! requested slice (one contiguous range for rows, one range per row for
//! columns), so a rank never reads the parts of a tensor it does not own.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};

use super::bytes::FileBytes;
use super::{Split, Weight, WeightsError};
use crate::progress::Tally;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor: where its bytes lie and how to read them.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: DType,
    dims: Vec<usize>,
    /// Offset of its first byte in the shard's map.
    start: usize,
}

impl Entry {
    fn stored_bytes(&self) -> u64 {
        (self.dims.iter().product::<usize>() * self.dtype.size_in_bytes()) as u64
    }
}

/// The safetensors files of a model directory, opened and checked.
pub struct Safetensors {
    dir: PathBuf,
    shards: Vec<FileBytes>,
    tensors: HashMap<String, Entry>,
    /// Bytes copied out of the maps so far (what loads actually read).
    copied: AtomicU64,
    /// Counts each tensor's stored bytes as a load goes through it, when set.
    tally: Option<Arc<Tally>>,
}

impl std::fmt::Debug for Safetensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Safetensors")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Safetensors {
    /// Opens the weights of `dir`: the shards its index names, else
    /// `model.safetensors`, else every `*.safetensors` file in it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join(INDEX_FILE);
        let files: Vec<PathBuf> = if index.exists() {
            index_shards(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if dir.join(SINGLE_FILE).exists() {
            vec![dir.join(SINGLE_FILE)]
        } else {
            let listing = std::fs::read_dir(&dir).map_err(|source| WeightsError::Io {
                path: dir.clone(),
                source,
            })?;
            let mut found: Vec<PathBuf> = listing
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if files.is_empty() {
            return Err(WeightsError::NoSafetensors { dir });
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let (map, entries) = open_shard(&path)?;
            for (name, mut entry) in entries {
                entry.shard = i;
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(WeightsError::BadSafetensors {
                        path,
                        reason: format!("tensor '{name}' is also in another shard"),
                    });
                }
            }
            shards.push(map);
        }
        Ok(Self {
            dir,
            shards,
            tensors,
            copied: AtomicU64::new(0),
            tally: None,
        })
    }

    /// One safetensors file held in memory, checked as [`Safetensors::open`]
    /// checks a shard; `name` stands for its path in messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self, WeightsError> {
        let name = name.into();
        let entries = read_header(&name, &bytes)?;
        Ok(Self {
            dir: name,
            shards: vec![FileBytes::Owned(bytes)],
            tensors: entries.into_iter().collect(),
            copied: AtomicU64::new(0),
            tally: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The stored type and shape of tensor `name`.
    pub fn tensor_info(&self, name: &str) -> Result<(DType, Vec<usize>), WeightsError> {
        let e = self.entry(name)?;
        Ok((e.dtype, e.dims.clone()))
    }

    /// Counts the load's progress in `tally`: every tensor's stored bytes are to do,
    /// and a load of any slice of a tensor does its bytes (each rank goes through
    /// every tensor, reading only its slices).
    pub fn count_into(&mut self, tally: Arc<Tally>) {
        tally.add_total(self.tensors.values().map(Entry::stored_bytes).sum());
        self.tally = Some(tally);
    }

    /// Bytes copied out of the files by loads so far.
    pub fn bytes_copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }

    /// Loads `split` of tensor `name` onto `device`, in its stored type,
    /// except BF16 on CPU, which becomes F32 (candle's CPU matmul has no BF16
    /// kernel and would widen the whole matrix on every product).
    pub fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError> {
        let e = self.entry(name)?;
        if let Some(tally) = &self.tally {
            tally.add_done(e.stored_bytes());
        }
        let bad = |reason: String| WeightsError::BadSplit {
            tensor: name.into(),
            reason,
        };
        // A vector is one row; its elements are what a split cuts.
        let (rows, cols, vector) = match e.dims.as_slice() {
            [n] => (1, *n, true),
            [r, c] => (*r, *c, false),
            dims => {
                return Err(bad(format!(
                    "has shape {dims:?}; only vectors and matrices are used"
                )));
            }
        };
        let size = e.dtype.size_in_bytes();
        let row_bytes = cols * size;
        let map = &self.shards[e.shard][e.start..e.start + rows * row_bytes];
        let (shape, bytes): (Vec<usize>, Vec<u8>) = match (split, vector) {
            (Split::Full, true) => (vec![cols], map.to_vec()),
            (Split::Full, false) => (vec![rows, cols], map.to_vec()),
            (Split::Rows(r), false) => {
                if r.start > r.end || r.end > rows {
                    return Err(bad(format!("rows {r:?} are outside its {rows} rows")));
                }
                (
                    vec![r.len(), cols],
                    map[r.start * row_bytes..r.end * row_bytes].to_vec(),
                )
            }
            (Split::Cols(c), _) | (Split::Rows(c), true) => {
                if c.start > c.end || c.end > cols {
                    return Err(bad(format!("columns {c:?} are outside its {cols} columns")));
                }
                let mut out = Vec::with_capacity(rows * c.len() * size);
                for row in map.chunks_exact(row_bytes.max(1)).take(rows) {
                    out.extend_from_slice(&row[c.start * size..c.end * size]);
                }
                let shape = if vector {
                    vec![c.len()]
                } else {
                    vec![rows, c.len()]
                };
                (shape, out)
            }
        };
        self.copied.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let candle = |source| WeightsError::Candle {
            tensor: name.into(),
            source,
        };
        let mut t = Tensor::from_raw_buffer(&bytes, e.dtype, &shape, device).map_err(candle)?;
        if e.dtype == DType::BF16 && device.is_cpu() {
            t = t.to_dtype(DType::F32).map_err(candle)?;
        }
        Ok(Weight::Dense(t))
    }

    fn entry(&self, name: &str) -> Result<&Entry, WeightsError> {
        self.tensors
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor {
                path: self.dir.clone(),
                name: name.into(),
            })
    }
}

/// The shard files an index names, each once, in order of first mention.
fn index_shards(index: &Path) -> Result<Vec<String>, WeightsError> {
    let bad = |reason: String| WeightsError::BadSafetensors {
        path: index.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|source| WeightsError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map` entry '{tensor}' is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("shard '{file}' is not a plain file name")));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}

/// Maps one safetensors file and reads its header.
fn open_shard(path: &Path) -> Result<(FileBytes, Vec<(String, Entry)>), WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the map is read-only and model files are not rewritten while served;
    // a file truncated underneath us is the one case this cannot guard against.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let entries = read_header(path, &map)?;
    Ok((FileBytes::Mapped(map), entries))
}

/// The tensors a safetensors file's header lists: every one must have a
/// supported type and lie inside the file (`path` names it in errors).
fn read_header(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Entry)>, WeightsError> {
    let bad = |reason: String| WeightsError::BadSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let len = bytes.len();
    if len < 8 {
        return Err(bad(format!("{len} bytes is too short for a header")));
    }
    let mut n_bytes = [0u8; 8];
    n_bytes.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n_bytes);
    if n > (len - 8) as u64 {
        return Err(bad(format!(
            "the header claims {n} bytes but the file has {len} bytes"
        )));
    }
    let header_end = 8 + n as usize;
    let header = std::str::from_utf8(&bytes[8..header_end])
        .map_err(|e| bad(format!("the header is not UTF-8: {e}")))?;
    let meta: Metadata =
        serde_json::from_str(header).map_err(|e| bad(format!("the header is invalid: {e}")))?;
    let mut entries = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        // With no values its other dimensions are bounded by nothing, and a load
        // sizes a row from them.
        if info.shape.contains(&0) {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?}, so no values",
                info.shape
            )));
        }
        let (start, end) = (
            header_end + info.data_offsets.0,
            header_end + info.data_offsets.1,
        );
        if end > len {
            return Err(WeightsError::Truncated {
                path: path.to_path_buf(),
                tensor: name,
                start: start as u64,
                end: end as u64,
                file_len: len as u64,
            });
        }
        let entry = Entry {
            shard: 0,
            dtype,
            dims: info.shape.clone(),
            start,
        };
        entries.push((name, entry));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    /// A 6×10 F32 matrix `m[r][c] = 100r + c` and a vector of 10.
    fn write(dir: &Path) {
        let m: Vec<u8> = (0..6)
            .flat_map(|r| (0..10).map(move |c| (100 * r + c) as f32))
            .flat_map(f32::to_le_bytes)
            .collect();
        let v: Vec<u8> = (0..10)
            .map(|i| i as f32)
            .flat_map(f32::to_le_bytes)
            .collect();
        let views = vec![
            ("m", TensorView::new(Dtype::F32, vec![6, 10], &m).unwrap()),
            ("v", TensorView::new(Dtype::F32, vec![10], &v).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        std::fs::write(dir.join(SINGLE_FILE), bytes).unwrap();
    }

    fn values(w: &Weight) -> (Vec<usize>, Vec<f32>) {
        let Weight::Dense(t) = w else { panic!("{w:?}") };
        (
            t.dims().to_vec(),
            t.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    #[test]
    fn slices_equal_parts_of_the_full_tensor_and_copy_only_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let st = Safetensors::open(dir.path()).unwrap();
        let cpu = Device::Cpu;
        let (_, full) = values(&st.load("m", &Split::Full, &cpu).unwrap());
        assert_eq!(st.bytes_copied(), 6 * 10 * 4);

        let before = st.bytes_copied();
        let (dims, rows) = values(&st.load("m", &Split::Rows(2..4), &cpu).unwrap());
        assert_eq!(dims, [2, 10]);
        assert_eq!(rows, full[20..40]);
        assert_eq!(st.bytes_copied() - before, 2 * 10 * 4);

        let before = st.bytes_copied();
        let (dims, cols) = values(&st.load("m", &Split::Cols(5..8), &cpu).unwrap());
        assert_eq!(dims, [6, 3]);
        let want: Vec<f32> = (0..6)
            .flat_map(|r| full[r * 10 + 5..r * 10 + 8].to_vec())
            .collect();
        assert_eq!(cols, want);
        assert_eq!(st.bytes_copied() - before, 6 * 3 * 4);

        let (dims, part) = values(&st.load("v", &Split::Rows(4..6), &cpu).unwrap());
        assert_eq!((dims, part), (vec![2], vec![4.0, 5.0]));
    }

    #[test]
    fn bad_splits_and_missing_tensors_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path());
        let st = Safetensors::open(dir.path()).unwrap();
        let cpu = Device::Cpu;
        let err = st.load("m", &Split::Rows(4..7), &cpu).unwrap_err();
        assert!(err.to_string().contains("outside its 6 rows"), "{err}");
        let err = st.load("nope", &Split::Full, &cpu).unwrap_err();
        assert!(matches!(err, WeightsError::MissingTensor { .. }), "{err}");
    }

    #[test]
    fn bad_header_and_empty_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Safetensors::open(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::NoSafetensors { .. }), "{err}");
        let path = dir.path().join(SINGLE_FILE);
        let mut bytes = 20u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{not json at all!!!}");
        std::fs::write(&path, bytes).unwrap();
        let err = Safetensors::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("header"),
            "{err}"
        );
        std::fs::write(&path, u64::MAX.to_le_bytes()).unwrap();
        let err = Safetensors::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("header claims"), "{err}");
    }
}
