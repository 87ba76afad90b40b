//! Inputs that crashed the readers, found by the `gguf` fuzz target (`make fuzz`) or
//! while it ran, each now refused with an error. The files are built here byte by byte.

use super::*;

/// GGUF type numbers of the tensors used here.
const F32: u32 = 0;
const Q4_1: u32 = 3;
/// GGUF type numbers of metadata values.
const U32: u32 = 4;
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// A GGUF v3 file: metadata `(key, type number, value bytes)`, then tensors
/// `(name, dims in ggml order (columns first), type number)` each at data offset
/// 0, then `data` from the first 32-byte boundary.
fn gguf(metadata: &[(&str, u32, &[u8])], tensors: &[(&str, &[u64], u32)], data: &[u8]) -> Vec<u8> {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, kind, value) in metadata {
        string(&mut out, key);
        out.extend(kind.to_le_bytes());
        out.extend(*value);
    }
    for (name, dims, kind) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(kind.to_le_bytes());
        out.extend(0u64.to_le_bytes());
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out.extend(data);
    out
}

fn header_error(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes("fuzz.gguf", bytes) {
        Err(e @ WeightsError::BadHeader { .. }) => e.to_string(),
        other => panic!("expected a header error, got {other:?}"),
    }
}

#[test]
fn a_tensor_of_more_bytes_than_fit_in_64_bits_is_refused() {
    // 2^62 F32 values: the count fits in 64 bits, its 2^64 bytes do not.
    let e = header_error(gguf(&[], &[("t", &[1 << 62], F32)], &[]));
    assert!(
        e.contains("tensor 't'") && e.contains("more bytes than fit"),
        "{e}"
    );
}

#[test]
fn a_gguf_tensor_without_values_is_refused() {
    // Found by the fuzzer: no rows, 2^61 + 32 columns. Its bytes (none) lie inside
    // the file, but the kernels' size of a group of rows overflowed.
    let e = header_error(gguf(&[], &[("t", &[(1 << 61) + 32, 0], Q4_1)], &[]));
    assert!(
        e.contains("tensor 't' has dimensions [0, 2305843009213693984], so no values"),
        "{e}"
    );
}

#[test]
fn a_safetensors_tensor_without_values_is_refused() {
    // The same as above, in a safetensors header: a load sized a row as 2^64 bytes.
    let header = r#"{"t":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    let e = Safetensors::from_bytes("fuzz.safetensors", bytes).unwrap_err();
    assert!(matches!(e, WeightsError::BadSafetensors { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("tensor 't' has shape [0, 4611686018427387904], so no values"),
        "{e}"
    );
}

#[test]
fn a_gguf_alignment_of_zero_is_refused() {
    // candle's reader rounds the data's start up to `general.alignment`: 0 divided by zero.
    let bytes = gguf(&[("general.alignment", U32, &0u32.to_le_bytes())], &[], &[]);
    let e = header_error(bytes);
    assert!(e.contains("general.alignment is 0"), "{e}");
}

#[test]
fn the_declared_alignment_is_found_past_strings_and_arrays() {
    let string = |s: &str| [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat();
    let array = |kind: u32, count: u64, items: &[u8]| {
        [&kind.to_le_bytes()[..], &count.to_le_bytes(), items].concat()
    };
    let strings = array(STRING, 2, &[string("ab"), string("")].concat());
    let nested = array(ARRAY, 1, &array(U32, 3, &[0; 12]));
    let bytes = gguf(
        &[
            ("general.name", STRING, &string("llama")),
            ("tokens", ARRAY, &strings),
            ("nested", ARRAY, &nested),
            ("general.alignment", U32, &64u32.to_le_bytes()),
            ("after", U32, &1u32.to_le_bytes()),
        ],
        &[],
        &[],
    );
    assert_eq!(alignment::declared_alignment(&bytes), Some(64));
    // Cut short anywhere, the walk gives up or finds the same value, never panics.
    for len in 0..bytes.len() {
        let found = alignment::declared_alignment(&bytes[..len]);
        assert!(matches!(found, None | Some(64)), "cut at {len}: {found:?}");
    }
}
