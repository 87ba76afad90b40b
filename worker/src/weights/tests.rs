use candle_core::Device;
use candle_core::quantized::GgmlDType;

use super::*;
use crate::model::tiny::{TinySpec, write_tiny_gguf};

fn tiny(dtype: GgmlDType) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(
        &path,
        &TinySpec {
            dtype,
            ..TinySpec::default()
        },
    )
    .unwrap();
    (dir, path)
}

fn dense(w: &Weight) -> Vec<Vec<f32>> {
    w.to_dense_f32().unwrap().to_vec2().unwrap()
}

#[test]
fn truncated_gguf_is_refused() {
    let (dir, path) = tiny(GgmlDType::Q8_0);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = GgufFile::open(&cut).unwrap_err();
    assert!(matches!(err, WeightsError::Truncated { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("cut.gguf") && msg.contains("truncated"),
        "{msg}"
    );
    // A cut inside the header is refused too, never a panic.
    let header_cut = dir.path().join("header.gguf");
    std::fs::write(&header_cut, &bytes[..40]).unwrap();
    let msg = GgufFile::open(&header_cut).unwrap_err().to_string();
    assert!(msg.contains("header.gguf"), "{msg}");
}

#[test]
fn wrong_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.bin");
    std::fs::write(&path, b"PK\x03\x04 not a gguf").unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("model.bin") && msg.contains("not a GGUF file"),
        "{msg}"
    );
    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(WeightsError::NotGguf { .. })
    ));
}

#[test]
fn missing_file_is_refused_with_its_path() {
    let msg = GgufFile::open("/no/such/model.gguf")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("/no/such/model.gguf"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let (_dir, path) = tiny(GgmlDType::F32);
    let file = GgufFile::open(&path).unwrap();
    let msg = file
        .load("blk.9.attn_q.weight", &Split::Full, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("blk.9.attn_q.weight"), "{msg}");
}

#[test]
fn row_and_column_slices_equal_parts_of_the_full_tensor() {
    for dtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let (_dir, path) = tiny(dtype);
        let file = GgufFile::open(&path).unwrap();
        let name = "blk.0.ffn_gate.weight"; // [128, 64]
        let full = dense(&file.load(name, &Split::Full, &Device::Cpu).unwrap());
        let rows = dense(&file.load(name, &Split::Rows(32..96), &Device::Cpu).unwrap());
        assert_eq!(rows, full[32..96].to_vec(), "{dtype:?} rows");
        let cols = dense(&file.load(name, &Split::Cols(32..64), &Device::Cpu).unwrap());
        let want: Vec<Vec<f32>> = full.iter().map(|r| r[32..64].to_vec()).collect();
        assert_eq!(cols, want, "{dtype:?} columns");
    }
}

#[test]
fn quantised_weights_stay_quantised() {
    let (_dir, path) = tiny(GgmlDType::Q4_1);
    let file = GgufFile::open(&path).unwrap();
    let w = file
        .load("blk.0.attn_q.weight", &Split::Full, &Device::Cpu)
        .unwrap();
    assert!(matches!(w, Weight::Blocks(_)));
}

#[test]
fn k_quants_load_through_candle_and_multiply() {
    use candle_core::Tensor;
    use candle_core::quantized::{QTensor, gguf_file};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.gguf");
    for dtype in [
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let t = Tensor::rand(-1f32, 1.0, (8, 512), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let mut f = std::fs::File::create(&path).unwrap();
        gguf_file::write(&mut f, &[], &[("w", &q)]).unwrap();
        drop(f);
        let file = GgufFile::open(&path).unwrap();
        let w = file.load("w", &Split::Full, &Device::Cpu).unwrap();
        assert!(matches!(w, Weight::Ggml(_)), "{dtype:?} stays quantised");
        assert_product_matches_dense(&w, 2, 0.3, &format!("{dtype:?}"));
        let half = file
            .load("w", &Split::Cols(256..512), &Device::Cpu)
            .unwrap();
        assert_eq!(half.dims(), vec![8, 256]);
        let err = file
            .load("w", &Split::Cols(0..128), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("256"), "{err}");
    }
}

#[test]
fn column_slices_must_not_cut_quantisation_blocks() {
    let (_dir, path) = tiny(GgmlDType::Q4_1);
    let file = GgufFile::open(&path).unwrap();
    let err = file
        .load("blk.0.ffn_gate.weight", &Split::Cols(0..48), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0..48") && err.contains("32"), "{err}");
    let err = file
        .load("blk.0.ffn_gate.weight", &Split::Rows(0..500), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("128 rows"), "{err}");
}

#[test]
fn quantised_products_match_dense_products() {
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ] {
        let (_dir, path) = tiny(dtype);
        let file = GgufFile::open(&path).unwrap();
        let w = file
            .load("blk.0.ffn_down.weight", &Split::Full, &Device::Cpu)
            .unwrap(); // [64, 128]
        assert_product_matches_dense(&w, 3, 0.0, &format!("{dtype:?}"));
    }
}

/// `w`'s product with `m` random rows equals the product with its dequantised
/// matrix, within what 8-bit activations (as llama.cpp quantises them) allow.
fn assert_product_matches_dense(w: &Weight, m: usize, slack: f32, what: &str) {
    use candle_core::Tensor;
    let dims = w.dims();
    let x = Tensor::rand(-1f32, 1.0, (m, dims[1]), &Device::Cpu).unwrap();
    let got = w
        .matmul_t(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m)
        .unwrap();
    let want = x
        .matmul(&w.to_dense_f32().unwrap().t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got.len(), want.len());
    for (g, r) in got.iter().zip(&want) {
        assert!(
            (g - r).abs() < 0.05 * (1.0 + r.abs()) + slack,
            "{what}: {g} vs {r}"
        );
    }
}

/// A GGUF file written byte by byte: one tensor `t` of ggml dims `ne` (innermost first),
/// type `ggml_type`, and `data`.
fn handmade_gguf(ne: &[u64], ggml_type: u32, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"GGUF");
    f.extend_from_slice(&3u32.to_le_bytes()); // version
    f.extend_from_slice(&1u64.to_le_bytes()); // tensors
    f.extend_from_slice(&0u64.to_le_bytes()); // metadata pairs
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b't');
    f.extend_from_slice(&(ne.len() as u32).to_le_bytes());
    for d in ne {
        f.extend_from_slice(&d.to_le_bytes());
    }
    f.extend_from_slice(&ggml_type.to_le_bytes());
    f.extend_from_slice(&0u64.to_le_bytes()); // offset in the data section
    f.resize(f.len().next_multiple_of(32), 0);
    f.extend_from_slice(data);
    f
}

#[test]
fn rows_that_cut_blocks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.gguf");
    // Q8_0 (type 8, blocks of 32 values in 34 bytes): 2 rows of 48 values hold 3 whole
    // blocks in total, but each row ends inside one.
    std::fs::write(&path, handmade_gguf(&[48, 2], 8, &[0; 3 * 34])).unwrap();
    let msg = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        msg.contains("rows.gguf") && msg.contains("rows of 48 values"),
        "{msg}"
    );
    // The same bytes as 3 rows of 32 values are a valid tensor.
    std::fs::write(&path, handmade_gguf(&[32, 3], 8, &[0; 3 * 34])).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensor_meta("t").unwrap().dims, [3, 32]);
}
