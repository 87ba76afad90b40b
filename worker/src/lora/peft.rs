//! PEFT adapter directories: `adapter_config.json` and `adapter_model.safetensors`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{LoraError, PairNames, ReadAdapter, Target, read_pairs};
use crate::weights::Safetensors;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` that change what the adapter computes.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f32>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    modules_to_save: Option<serde_json::Value>,
}

pub(super) fn read(dir: &Path) -> Result<ReadAdapter, LoraError> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|source| LoraError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config: PeftConfig = serde_json::from_str(&text).map_err(|e| LoraError::NotAnAdapter {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    let field = |field: &str, problem: String| LoraError::Config {
        path: config_path.clone(),
        field: field.into(),
        problem,
    };
    if let Some(kind) = &config.peft_type
        && !kind.eq_ignore_ascii_case("LORA")
    {
        return Err(field(
            "peft_type",
            format!("{kind}; only LORA adapters are served"),
        ));
    }
    let rank = config
        .r
        .ok_or_else(|| field("r", "missing: the adapter's rank".into()))?;
    let alpha = config
        .lora_alpha
        .ok_or_else(|| field("lora_alpha", "missing".into()))?;
    if config.use_dora {
        return Err(field("use_dora", "DoRA adapters are not supported".into()));
    }
    if config.fan_in_fan_out {
        return Err(field(
            "fan_in_fan_out",
            "transposed (Conv1D) layers are not Llama's; not supported".into(),
        ));
    }
    if let Some(bias) = &config.bias
        && bias != "none"
    {
        return Err(field(
            "bias",
            format!("\"{bias}\": adapters that train biases are not supported"),
        ));
    }
    if !config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty() {
        return Err(field(
            "rank_pattern",
            "per-layer ranks or alphas are not supported".into(),
        ));
    }
    if let Some(saved) = &config.modules_to_save
        && !saved.is_null()
        && saved.as_array().is_none_or(|a| !a.is_empty())
    {
        return Err(field(
            "modules_to_save",
            format!("{saved}: adapters that replace whole modules are not supported"),
        ));
    }
    if let Some(serde_json::Value::Array(names)) = &config.target_modules {
        for name in names {
            let name = name.as_str().unwrap_or_default();
            if Target::from_peft(name).is_none() {
                return Err(field(
                    "target_modules",
                    format!(
                        "'{name}' is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, \
                         up_proj, down_proj"
                    ),
                ));
            }
        }
    }

    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(LoraError::NotAnAdapter {
            path: dir.join("adapter_model.bin"),
            reason: "pickled weights are not read; save the adapter with safetensors".into(),
        });
    }
    let bytes = std::fs::read(&weights_path).map_err(|source| LoraError::Io {
        path: weights_path.clone(),
        source,
    })?;
    let file =
        Safetensors::from_bytes(&weights_path, bytes).map_err(|e| LoraError::NotAnAdapter {
            path: weights_path.clone(),
            reason: e.to_string(),
        })?;
    let tensor_error = |tensor: &str, problem: String| LoraError::Tensor {
        path: weights_path.clone(),
        tensor: tensor.into(),
        problem,
    };
    let naming = PairNames {
        parse: parse_name,
        expected: "a lora_A/lora_B weight of a q/k/v/o/gate/up/down projection",
        pair: |layer, target| format!("layers.{layer}.{}", target.peft_name()),
        halves: "lora_A and lora_B",
    };
    let tensors = read_pairs(file.tensor_names(), &file, &naming, tensor_error)?;
    Ok(ReadAdapter {
        file: weights_path,
        rank: Some(rank),
        alpha,
        rslora: config.use_rslora,
        hf_layout: true,
        tensors,
    })
}

/// `(layer, target, 0 for A | 1 for B)` of a PEFT tensor name such as
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (an adapter
/// name may sit between `lora_A` and `weight`).
fn parse_name(name: &str) -> Option<(usize, Target, usize)> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.last() != Some(&"weight") {
        return None;
    }
    let at = parts.iter().position(|p| *p == "layers")?;
    let layer = parts.get(at + 1)?.parse().ok()?;
    let lora = parts
        .iter()
        .position(|p| *p == "lora_A" || *p == "lora_B")?;
    let half = usize::from(parts[lora] == "lora_B");
    let target = Target::from_peft(parts.get(lora.checked_sub(1)?)?)?;
    Some((layer, target, half))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_names_parse_with_and_without_an_adapter_name() {
        assert_eq!(
            parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Some((3, Target::Q, 0))
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.12.mlp.down_proj.lora_B.default.weight"),
            Some((12, Target::Down, 1))
        );
        assert_eq!(
            parse_name("base_model.model.lm_head.lora_A.weight"),
            None,
            "the head is not a target"
        );
        assert_eq!(
            parse_name("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
            None
        );
    }
}
