//! Random adapters written as PEFT directories or GGUF LoRA files, for tests.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::Target;
use crate::model::ModelConfig;
use crate::model::tiny::random;

/// An adapter's matrices, `A: [rank, in]` and `B: [out, rank]` per `(layer,
/// target)`, in the layout of the files they are written to.
#[derive(Clone, Debug)]
pub struct TestAdapter {
    pub rank: usize,
    pub alpha: f32,
    pub pairs: BTreeMap<(usize, Target), (Vec<f32>, Vec<f32>)>,
}

impl TestAdapter {
    /// Random matrices for `targets` of every layer of `cfg`.
    pub fn random(cfg: &ModelConfig, rank: usize, targets: &[Target], seed: u64) -> Self {
        let mut seed = seed;
        let mut pairs = BTreeMap::new();
        for layer in 0..cfg.num_layers {
            for &t in targets {
                let (inputs, outputs) = t.dims(cfg);
                let a = random(rank * inputs, &mut seed, 0.2);
                let b = random(outputs * rank, &mut seed, 0.2);
                pairs.insert((layer, t), (a, b));
            }
        }
        Self {
            rank,
            alpha: 2.0 * rank as f32,
            pairs,
        }
    }

    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// A PEFT directory; `config` entries replace the written config's.
    pub fn write_peft(&self, dir: &Path, cfg: &ModelConfig, config: serde_json::Value) {
        std::fs::create_dir_all(dir).unwrap();
        let targets: Vec<&str> = self
            .pairs
            .keys()
            .map(|(_, t)| t.peft_name())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut written = serde_json::json!({
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": targets,
            "bias": "none",
            "base_model_name_or_path": "tiny",
        });
        if let (Some(w), Some(c)) = (written.as_object_mut(), config.as_object()) {
            for (k, v) in c {
                w.insert(k.clone(), v.clone());
            }
        }
        std::fs::write(dir.join(super::peft::CONFIG_FILE), written.to_string()).unwrap();
        let mut tensors = HashMap::new();
        for (&(layer, t), (a, b)) in &self.pairs {
            let (inputs, outputs) = t.dims(cfg);
            let group = match t {
                Target::Gate | Target::Up | Target::Down => "mlp",
                _ => "self_attn",
            };
            let p = format!(
                "base_model.model.model.layers.{layer}.{group}.{}",
                t.peft_name()
            );
            let a = Tensor::from_slice(a, (self.rank, inputs), &Device::Cpu).unwrap();
            let b = Tensor::from_slice(b, (outputs, self.rank), &Device::Cpu).unwrap();
            tensors.insert(format!("{p}.lora_A.weight"), a);
            tensors.insert(format!("{p}.lora_B.weight"), b);
        }
        candle_core::safetensors::save(&tensors, dir.join(super::peft::WEIGHTS_FILE)).unwrap();
    }

    /// A llama.cpp GGUF LoRA file for a base of architecture `cfg.architecture`.
    pub fn write_gguf(&self, path: &Path, cfg: &ModelConfig) {
        let mut tensors = Vec::new();
        for (&(layer, t), (a, b)) in &self.pairs {
            let (inputs, outputs) = t.dims(cfg);
            let base = format!("blk.{layer}.{}.weight", t.gguf_name());
            let q = |v: &[f32], dims: (usize, usize)| {
                let t = Tensor::from_slice(v, dims, &Device::Cpu).unwrap();
                QTensor::quantize(&t, GgmlDType::F32).unwrap()
            };
            tensors.push((format!("{base}.lora_a"), q(a, (self.rank, inputs))));
            tensors.push((format!("{base}.lora_b"), q(b, (outputs, self.rank))));
        }
        let metadata = [
            (
                "general.architecture",
                Value::String(cfg.architecture.clone()),
            ),
            ("general.type", Value::String("adapter".into())),
            ("adapter.type", Value::String("lora".into())),
            ("adapter.lora.alpha", Value::F32(self.alpha)),
        ];
        let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &md, &ts).unwrap();
    }

    /// `W + s·B·A` for each adapted weight among `tensors` (GGUF names, f32): the
    /// merged model an unmerged adapter must match.
    pub fn merge_into(&self, tensors: &mut [(String, Tensor)]) {
        for (&(layer, t), (a, b)) in &self.pairs {
            let name = format!("blk.{layer}.{}.weight", t.gguf_name());
            let (_, w) = tensors.iter_mut().find(|(n, _)| *n == name).unwrap();
            let (outputs, inputs) = w.dims2().unwrap();
            let a = Tensor::from_slice(a, (self.rank, inputs), &Device::Cpu).unwrap();
            let b = Tensor::from_slice(b, (outputs, self.rank), &Device::Cpu).unwrap();
            let delta = (b.matmul(&a).unwrap() * f64::from(self.scale())).unwrap();
            *w = (&*w + delta).unwrap();
        }
    }
}
