//! PEFT adapters for the demo model, written by the tests (f16 weights, rank 8
//! on q_proj and v_proj, as fine-tunes usually ship).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

/// SmolLM2-135M: hidden size 576, 9 query and 3 key/value heads of 64, 30 layers.
pub const HIDDEN: usize = 576;
pub const KV_WIDTH: usize = 3 * 64;
pub const LAYERS: usize = 30;
pub const RANK: usize = 8;

/// Deterministic values in [-scale, scale), as f16 bytes.
fn f16_bytes(n: usize, seed: &mut u64, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = ((*seed >> 40) as f32) / (1u64 << 24) as f32;
            half::f16::from_f32((2.0 * unit - 1.0) * scale).to_le_bytes()
        })
        .collect()
}

/// A PEFT directory; `v_rows` is the row count written for v_proj's B (the
/// base's is KV_WIDTH: anything else is a broken adapter).
pub fn write_peft(dir: &Path, seed: u64, v_rows: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut seed = seed;
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..LAYERS {
        for (module, rows) in [("q_proj", HIDDEN), ("v_proj", v_rows)] {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            let a = f16_bytes(RANK * HIDDEN, &mut seed, 0.05);
            let b = f16_bytes(rows * RANK, &mut seed, 0.05);
            data.push((format!("{p}.lora_A.weight"), vec![RANK, HIDDEN], a));
            data.push((format!("{p}.lora_B.weight"), vec![rows, RANK], b));
        }
    }
    let views: HashMap<String, TensorView<'_>> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F16, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(&views, None, &dir.join("adapter_model.safetensors")).unwrap();
}
