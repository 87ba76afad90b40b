//! llama.cpp's GGUF LoRA files (`convert_lora_to_gguf.py`): `general.type =
//! adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and tensors
//! `blk.N.<layer>.weight.lora_a` / `.lora_b`, already in the GGUF row layout.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::{LoraError, PairNames, ReadAdapter, Target, read_pairs};
use crate::model::ModelConfig;
use crate::weights::GgufFile;

pub(super) fn read(path: &Path, base: &ModelConfig) -> Result<ReadAdapter, LoraError> {
    let file = GgufFile::open(path).map_err(|e| LoraError::NotAnAdapter {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let metadata = file.metadata();
    let text = |key: &str| match metadata.get(key) {
        Some(Value::String(s)) => Some(s.as_str()),
        _ => None,
    };
    let field = |field: &str, problem: String| LoraError::Config {
        path: path.to_path_buf(),
        field: field.into(),
        problem,
    };
    if text("general.type") != Some("adapter") {
        return Err(LoraError::NotAnAdapter {
            path: path.to_path_buf(),
            reason: format!(
                "general.type is {:?}, not \"adapter\" (a model file, not a LoRA?)",
                text("general.type").unwrap_or("missing")
            ),
        });
    }
    if let Some(kind) = text("adapter.type")
        && kind != "lora"
    {
        return Err(field(
            "adapter.type",
            format!("\"{kind}\"; only lora adapters are served"),
        ));
    }
    if let Some(arch) = text("general.architecture")
        && arch != base.architecture
    {
        return Err(field(
            "general.architecture",
            format!(
                "\"{arch}\", but the base model is \"{}\"",
                base.architecture
            ),
        ));
    }
    let alpha = match metadata.get("adapter.lora.alpha") {
        None => 0.0,
        Some(Value::F32(a)) => *a,
        Some(Value::F64(a)) => *a as f32,
        Some(other) => {
            return Err(field(
                "adapter.lora.alpha",
                format!("{other:?}, not a number"),
            ));
        }
    };

    let tensor_error = |tensor: &str, problem: String| LoraError::Tensor {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        problem,
    };
    let naming = PairNames {
        parse: parse_name,
        expected: "a lora_a/lora_b of blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,\
                   ffn_down}.weight",
        pair: |layer, target| format!("blk.{layer}.{}.weight", target.gguf_name()),
        halves: "lora_a and lora_b",
    };
    let tensors = read_pairs(file.tensor_names(), &file, &naming, tensor_error)?;
    Ok(ReadAdapter {
        file: path.to_path_buf(),
        rank: None,
        alpha,
        rslora: false,
        hf_layout: false,
        tensors,
    })
}

/// `(layer, target, 0 for A | 1 for B)` of `blk.N.attn_q.weight.lora_a`.
fn parse_name(name: &str) -> Option<(usize, Target, usize)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, half) = rest.split_once(".weight.")?;
    let half = match half {
        "lora_a" => 0,
        "lora_b" => 1,
        _ => return None,
    };
    Some((layer.parse().ok()?, Target::from_gguf(module)?, half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_lora_names_parse() {
        assert_eq!(
            parse_name("blk.7.ffn_down.weight.lora_b"),
            Some((7, Target::Down, 1))
        );
        assert_eq!(parse_name("blk.0.attn_q.weight"), None);
        assert_eq!(parse_name("token_embd.weight.lora_a"), None);
    }
}
