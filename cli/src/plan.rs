//! `shardserve plan MANIFEST`: what the operator would create for a
//! manifest, and whether the model fits the GPUs — before applying it.
//! The model's shape comes from `spec.model.shape`, else from the model's
//! own config when the source is reachable here (a GGUF header or a
//! `config.json`), so planning works offline. For an `hf://` model directory
//! only its `config.json` is fetched (a few KB, where the whole directory's
//! fetch would put it), not the weights.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};
use shardserve_operator::crd::ModelFormat;
use shardserve_operator::plan::{Plan, Shape, gib, parse_bytes, plan};
use shardserve_operator::{ModelDeployment, ModelSource, parse_manifests};
use shardserve_worker::model::ModelConfig;
use shardserve_worker::weights::GgufFile;

use crate::model;

/// GPU memory assumed when neither `--gpu-memory` nor `spec.gpu.memory` says.
const DEFAULT_GPU_MEMORY: &str = "80GiB";

#[derive(Args)]
pub struct PlanArgs {
    /// A ModelDeployment manifest (YAML).
    manifest: PathBuf,
    /// Memory of one GPU (80GiB, 141GB, …). Defaults to spec.gpu.memory, else 80GiB.
    #[arg(long)]
    gpu_memory: Option<String>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Cache directory for pip:// and hf:// sources.
    #[arg(long, env = "SHARDSERVE_CACHE")]
    cache: Option<PathBuf>,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let file = args.manifest.display().to_string();
    let text = std::fs::read_to_string(&args.manifest)
        .with_context(|| format!("reading manifest {file}"))?;
    let mds = parse_manifests(&text).map_err(|e| anyhow!("{file}: {e}"))?;
    let base = args.manifest.parent().unwrap_or(Path::new("."));
    let hub = model::hub_settings();
    let mut plans = Vec::new();
    for md in &mds {
        let shape = shape_of(md, base, args.cache.clone(), &hub)
            .with_context(|| format!("{file}: {}: the model's shape", md.name()))?;
        let memory = gpu_memory(md, args.gpu_memory.as_deref())?;
        plans.push((md, memory, plan(&md.spec, &shape, memory)));
    }
    if args.json {
        let mut out: Vec<Value> = plans.iter().map(|(_, _, p)| to_json(p)).collect();
        let out = if out.len() == 1 {
            out.remove(0)
        } else {
            Value::Array(out)
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for (md, memory, p) in &plans {
            print_plan(md, *memory, p);
        }
    }
    Ok(())
}

fn gpu_memory(md: &ModelDeployment, flag: Option<&str>) -> Result<u64> {
    let text = match (flag, &md.spec.gpu.memory) {
        (Some(flag), _) => flag.to_string(),
        (None, Some(q)) => q.0.clone(),
        (None, None) => DEFAULT_GPU_MEMORY.to_string(),
    };
    Ok(parse_bytes(&text)?)
}

/// The `--json` contract: exactly these keys.
fn to_json(p: &Plan) -> Value {
    json!({
        "groups": p.groups,
        "pods_per_group": p.pods_per_group,
        "gpus_per_pod": p.gpus_per_pod,
        "weight_bytes_per_gpu": p.weight_bytes_per_gpu,
        "kv_cache_bytes_per_gpu": p.kv_cache_bytes_per_gpu,
        "max_context_tokens": p.max_context_tokens,
        "fits": p.fits(),
        "reasons": p.reasons.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

fn print_plan(md: &ModelDeployment, memory: u64, p: &Plan) {
    let spec = &md.spec;
    println!("{} (serves {:?})", md.name(), md.served_model_name());
    println!(
        "  topology: {} group(s) × {} pod(s), {} rank(s) and {} {} per pod (tensor {})",
        p.groups,
        p.pods_per_group,
        p.ranks_per_pod,
        p.gpus_per_pod,
        spec.gpu.resource_name,
        spec.tensor
    );
    println!(
        "  pod layout: one container with the pod's {} {} runs its {} rank process(es), \
         one GPU each, NCCL between them over NVLink",
        p.gpus_per_pod, spec.gpu.resource_name, p.ranks_per_pod
    );
    println!("  GPU memory: {} each", gib(memory));
    println!("  weights per GPU: {}", gib(p.weight_bytes_per_gpu));
    println!("  KV cache per GPU: {}", gib(p.kv_cache_bytes_per_gpu));
    println!(
        "  longest context: {} tokens ({} bytes of KV per token per GPU)",
        p.max_context_tokens, p.kv_bytes_per_token_per_gpu
    );
    if p.fits() {
        println!("  fits: yes");
    } else {
        println!("  fits: no");
        for reason in &p.reasons {
            println!("    - {reason}");
        }
    }
}

/// `spec.model.shape`, else the shape read from the model's files here.
pub(crate) fn shape_of(
    md: &ModelDeployment,
    base: &Path,
    cache: Option<PathBuf>,
    hub: &model::HubSettings,
) -> Result<Shape> {
    let model = &md.spec.model;
    if let Some(shape) = &model.shape {
        return Ok(Shape::from_spec(shape, model.dtype));
    }
    let source = ModelSource::parse(&model.source)?;
    if let ModelSource::HuggingFace {
        repo,
        revision,
        file: None,
    } = &source
    {
        let config = ModelSource::HuggingFace {
            repo: repo.clone(),
            revision: revision.clone(),
            file: Some("config.json".into()),
        };
        let path = model::resolve_with(&config, base, &model::cache_dir(cache)?, hub)
            .with_context(|| {
                format!("no spec.model.shape, and {source}'s config.json is not reachable here")
            })?;
        return shape_from_config_json(&path, md);
    }
    if let ModelSource::File { path } = &source {
        let dir = base.join(path);
        if dir.is_dir() {
            return shape_from_config_json(&dir.join("config.json"), md);
        }
    }
    if model.effective_format() == ModelFormat::Safetensors {
        bail!(
            "{source} is a safetensors checkpoint; give spec.model.shape, a file:// directory holding its config.json, or its hf:// directory"
        );
    }
    let path = model::resolve(&source, base, &model::cache_dir(cache)?).with_context(
        || "no spec.model.shape, and the model is not reachable here to read its config",
    )?;
    shape_from_gguf(&path, md)
}

fn shape_from_gguf(path: &Path, md: &ModelDeployment) -> Result<Shape> {
    let file = GgufFile::open(path)?;
    let config = ModelConfig::from_gguf(&file)?;
    // Average bytes per weight over the file's tensors (quantised blocks
    // with their scales, f32 norms): what the weights really take.
    let (mut bytes, mut weights) = (0u64, 0u64);
    for name in file.tensor_names() {
        let meta = file.tensor_meta(name)?;
        let n: usize = meta.dims.iter().product();
        bytes += (n / meta.dtype.block_size() * meta.dtype.type_size()) as u64;
        weights += n as u64;
    }
    let bytes_per_weight = match md.spec.model.dtype {
        Some(dtype) => dtype.bytes_per_weight(),
        None if weights > 0 => bytes as f64 / weights as f64,
        None => shardserve_operator::plan::DEFAULT_BYTES_PER_WEIGHT,
    };
    Ok(Shape {
        layers: config.num_layers as u64,
        hidden_size: config.hidden_size as u64,
        heads: config.num_heads as u64,
        kv_heads: config.num_kv_heads as u64,
        head_dim: config.head_dim as u64,
        vocab_size: config.vocab_size as u64,
        intermediate_size: config.intermediate_size as u64,
        tied_embeddings: config.tied_embeddings,
        bytes_per_weight,
    })
}

/// The sizes from a Hugging Face `config.json`.
fn shape_from_config_json(path: &Path, md: &ModelDeployment) -> Result<Shape> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let field = |name: &str| {
        config[name]
            .as_u64()
            .ok_or_else(|| anyhow!("{}: no integer {name:?}", path.display()))
    };
    let heads = field("num_attention_heads")?;
    let hidden = field("hidden_size")?;
    let torch_bytes = match config["torch_dtype"].as_str() {
        Some("float32") => 4.0,
        _ => shardserve_operator::plan::DEFAULT_BYTES_PER_WEIGHT,
    };
    Ok(Shape {
        layers: field("num_hidden_layers")?,
        hidden_size: hidden,
        heads,
        kv_heads: field("num_key_value_heads").unwrap_or(heads),
        head_dim: field("head_dim").unwrap_or(hidden / heads.max(1)),
        vocab_size: field("vocab_size")?,
        intermediate_size: field("intermediate_size")?,
        tied_embeddings: config["tie_word_embeddings"].as_bool().unwrap_or(false),
        bytes_per_weight: md
            .spec
            .model
            .dtype
            .map_or(torch_bytes, |d| d.bytes_per_weight()),
    })
}
