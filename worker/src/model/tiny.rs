//! Tiny random Llama models written as GGUF files, for tests that must not
//! depend on a downloaded model (and for shapes the demo model lacks).

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The shape of a tiny model.
#[derive(Clone, Debug)]
pub struct TinySpec {
    pub architecture: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    /// Type of the linear layers' weights (norms stay F32).
    pub dtype: GgmlDType,
    /// Write a separate `output.weight` instead of tying it to the embedding.
    pub separate_head: bool,
    /// Write Q/K/V biases (Qwen2 style).
    pub qkv_bias: bool,
    /// Leave out this tensor (to test refusals).
    pub omit: Option<&'static str>,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            architecture: "llama",
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 96,
            dtype: GgmlDType::F32,
            separate_head: false,
            qkv_bias: false,
            omit: None,
            seed: 1,
        }
    }
}

/// Deterministic pseudo-random values in [-scale, scale].
pub fn random(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Writes the model described by `spec` to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> candle_core::Result<()> {
    write_gguf(path, spec, &tiny_tensors(spec)?)
}

/// The random F32 tensors of the model described by `spec`, by GGUF name
/// (without `spec.omit`).
pub fn tiny_tensors(spec: &TinySpec) -> candle_core::Result<Vec<(String, Tensor)>> {
    let dev = Device::Cpu;
    let mut seed = spec.seed;
    let head_dim = spec.hidden / spec.heads;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    let mut add = |name: String, dims: &[usize], _dtype: GgmlDType, seed: &mut u64, scale: f32| {
        let n = dims.iter().product();
        let t = Tensor::from_vec(random(n, seed, scale), dims, &dev)?;
        tensors.push((name, t));
        Ok::<(), candle_core::Error>(())
    };
    add(
        "token_embd.weight".into(),
        &[spec.vocab, spec.hidden],
        spec.dtype,
        &mut seed,
        1.0,
    )?;
    for l in 0..spec.layers {
        let p = format!("blk.{l}");
        let w = 0.2;
        add(
            format!("{p}.attn_norm.weight"),
            &[spec.hidden],
            GgmlDType::F32,
            &mut seed,
            1.0,
        )?;
        add(
            format!("{p}.ffn_norm.weight"),
            &[spec.hidden],
            GgmlDType::F32,
            &mut seed,
            1.0,
        )?;
        add(
            format!("{p}.attn_q.weight"),
            &[spec.hidden, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.attn_k.weight"),
            &[spec.kv_heads * head_dim, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.attn_v.weight"),
            &[spec.kv_heads * head_dim, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.attn_output.weight"),
            &[spec.hidden, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.ffn_gate.weight"),
            &[spec.ffn, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.ffn_up.weight"),
            &[spec.ffn, spec.hidden],
            spec.dtype,
            &mut seed,
            w,
        )?;
        add(
            format!("{p}.ffn_down.weight"),
            &[spec.hidden, spec.ffn],
            spec.dtype,
            &mut seed,
            w,
        )?;
        if spec.qkv_bias {
            add(
                format!("{p}.attn_q.bias"),
                &[spec.hidden],
                GgmlDType::F32,
                &mut seed,
                w,
            )?;
            add(
                format!("{p}.attn_k.bias"),
                &[spec.kv_heads * head_dim],
                GgmlDType::F32,
                &mut seed,
                w,
            )?;
            add(
                format!("{p}.attn_v.bias"),
                &[spec.kv_heads * head_dim],
                GgmlDType::F32,
                &mut seed,
                w,
            )?;
        }
    }
    add(
        "output_norm.weight".into(),
        &[spec.hidden],
        GgmlDType::F32,
        &mut seed,
        1.0,
    )?;
    if spec.separate_head {
        add(
            "output.weight".into(),
            &[spec.vocab, spec.hidden],
            spec.dtype,
            &mut seed,
            1.0,
        )?;
    }
    tensors.retain(|(n, _)| Some(n.as_str()) != spec.omit);
    Ok(tensors)
}

/// Writes `tensors` as a GGUF model with `spec`'s metadata: matrices in
/// `spec.dtype`, vectors (norms, biases) in F32.
pub fn write_gguf(
    path: &Path,
    spec: &TinySpec,
    tensors: &[(String, Tensor)],
) -> candle_core::Result<()> {
    let tensors = tensors
        .iter()
        .map(|(name, t)| {
            let dtype = if t.rank() == 1 {
                GgmlDType::F32
            } else {
                spec.dtype
            };
            Ok((name.clone(), QTensor::quantize(t, dtype)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let a = spec.architecture;
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(spec.layers as u32)),
        (format!("{a}.context_length"), Value::U32(256)),
        (
            format!("{a}.embedding_length"),
            Value::U32(spec.hidden as u32),
        ),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(spec.ffn as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(spec.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(spec.kv_heads as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{a}.vocab_size"), Value::U32(spec.vocab as u32)),
    ];
    let mut file = std::fs::File::create(path)?;
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts)
}
