//! The planner on real shapes. Expected numbers are worked out by hand in
//! the comments (GiB = 2^30, GB = 10^9; usable = memory × 90 %; runtime
//! overhead 2 GiB = 2,147,483,648 bytes; bfloat16 weights and KV cache).

use super::*;
use crate::crd::{GpuSpec, ModelDeploymentSpec, ModelShape, WeightDtype};

const GIB: u64 = 1 << 30;
const GB: u64 = 1_000_000_000;

/// Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads (head 128),
/// MLP 14336, vocabulary 128256, untied head.
fn llama3_8b() -> Shape {
    shape(32, 4096, 32, 8, 128_256, 14_336, false, 2.0)
}

/// Llama-3-70B: 80 layers, hidden 8192, 64 heads, 8 KV heads (head 128),
/// MLP 28672, vocabulary 128256, untied head.
fn llama3_70b() -> Shape {
    shape(80, 8192, 64, 8, 128_256, 28_672, false, 2.0)
}

/// SmolLM2-135M: 30 layers, hidden 576, 9 heads, 3 KV heads (head 64), MLP
/// 1536, vocabulary 49152, tied embeddings; the demo's Q4_1 is 0.625 B/weight.
fn smollm2() -> Shape {
    shape(30, 576, 9, 3, 49_152, 1536, true, 0.625)
}

#[allow(clippy::too_many_arguments)] // mirrors the config's fields one to one
fn shape(
    layers: u32,
    hidden: u32,
    heads: u32,
    kv: u32,
    vocab: u32,
    inter: u32,
    tied: bool,
    bpw: f64,
) -> Shape {
    Shape::from_spec(
        &ModelShape {
            layers,
            hidden_size: hidden,
            heads,
            kv_heads: Some(kv),
            head_dim: None,
            vocab_size: vocab,
            intermediate_size: inter,
            tied_embeddings: tied,
            bytes_per_weight: Some(bpw),
        },
        None,
    )
}

fn spec(tensor: u32, per_node: u32) -> ModelDeploymentSpec {
    let mut spec = ModelDeploymentSpec::from_source("hf://meta-llama/Meta-Llama-3-70B-Instruct");
    spec.tensor = tensor;
    spec.gpu = GpuSpec {
        per_node,
        ..GpuSpec::default()
    };
    spec
}

#[test]
fn parameter_counts_match_the_published_sizes() {
    // 8B: embed 128256·4096 = 525,336,576, twice (untied) = 1,050,673,152;
    // layer: q,o 2·4096·4096 = 33,554,432; k,v 2·4096·1024 = 8,388,608;
    // MLP 3·4096·14336 = 176,160,768; norms 8192 → 218,112,000 × 32 =
    // 6,979,584,000; + final norm 4096 → 8,030,261,248.
    assert_eq!(llama3_8b().total_params(), 8_030_261_248);
    // 70B: 2·128256·8192 = 2,101,346,304; layer: q,o 134,217,728, k,v
    // 16,777,216, MLP 704,643,072, norms 16,384 → 855,654,400 × 80 =
    // 68,452,352,000; + 8192 → 70,553,706,496.
    assert_eq!(llama3_70b().total_params(), 70_553_706_496);
    // SmolLM2: tied embed 49152·576 = 28,311,552; layer: q,o 663,552, k,v
    // 2·576·192 = 221,184, MLP 2,654,208, norms 1152 → 3,540,096 × 30 =
    // 106,202,880; + 576 → 134,515,008.
    assert_eq!(smollm2().total_params(), 134_515_008);
}

#[test]
fn llama3_8b_on_one_80gib_gpu() {
    let p = plan(&spec(1, 8), &llama3_8b(), 80 * GIB);
    assert_eq!(
        (p.groups, p.pods_per_group, p.ranks_per_pod, p.gpus_per_pod),
        (1, 1, 1, 1)
    );
    // 8,030,261,248 weights × 2 bytes.
    assert_eq!(p.weight_bytes_per_gpu, 16_060_522_496);
    // 80 GiB × 0.9 = 77,309,411,328 − 16,060,522,496 − 2,147,483,648.
    assert_eq!(p.kv_cache_bytes_per_gpu, 59_101_405_184);
    // 2 (K and V) × 32 layers × 8 KV heads × 128 × 2 bytes = 131,072.
    assert_eq!(p.kv_bytes_per_token_per_gpu, 131_072);
    // 59,101,405,184 / 131,072 = 450,907 (rounded down).
    assert_eq!(p.max_context_tokens, 450_907);
    assert!(p.fits(), "{:?}", p.reasons);
}

#[test]
fn llama3_8b_tp2_on_40gb_halves_weights_and_kv_per_token() {
    let p = plan(&spec(2, 8), &llama3_8b(), 40 * GB);
    // Every matrix halves; 2 norms × 32 layers + 1 stay whole:
    // 4,015,263,744 weights × 2.
    assert_eq!(p.weight_bytes_per_gpu, 8_030_527_488);
    // 36,000,000,000 − 8,030,527,488 − 2,147,483,648.
    assert_eq!(p.kv_cache_bytes_per_gpu, 25_821_988_864);
    // 4 local KV heads: 2 × 32 × 4 × 128 × 2 = 65,536 → 394,012 tokens.
    assert_eq!(p.kv_bytes_per_token_per_gpu, 65_536);
    assert_eq!(p.max_context_tokens, 394_012);
    assert_eq!(p.gpus_per_pod, 2);
    assert!(p.fits());
}

#[test]
fn llama3_70b_tp2_fits_only_on_141gb() {
    // Rank: 35,277,512,704 weights × 2 = 70,555,025,408 bytes.
    for gpu in [40 * GB, 80 * GB] {
        let p = plan(&spec(2, 8), &llama3_70b(), gpu);
        assert_eq!(p.weight_bytes_per_gpu, 70_555_025_408);
        assert!(!p.fits());
        assert_eq!(p.kv_cache_bytes_per_gpu, 0);
        assert_eq!(p.max_context_tokens, 0);
        let usable = gpu / 10 * 9;
        assert_eq!(
            p.reasons,
            [Misfit::WeightsTooBig {
                needed: 70_555_025_408 + RUNTIME_OVERHEAD_BYTES,
                usable
            }]
        );
        assert!(
            p.reasons[0]
                .to_string()
                .starts_with("weights and runtime need 67.71 GiB")
        );
    }
    let p = plan(&spec(2, 8), &llama3_70b(), 141 * GB);
    // 126,900,000,000 − 70,555,025,408 − 2,147,483,648 = 54,197,490,944;
    // 4 local KV heads: 2 × 80 × 4 × 128 × 2 = 163,840 per token.
    assert_eq!(p.kv_cache_bytes_per_gpu, 54_197_490_944);
    assert_eq!(p.kv_bytes_per_token_per_gpu, 163_840);
    assert_eq!(p.max_context_tokens, 330_795);
    assert!(p.fits());
}

#[test]
fn llama3_70b_tp4() {
    // Rank: 17,639,415,808 weights × 2 = 35,278,831,616 bytes.
    let p = plan(&spec(4, 8), &llama3_70b(), 40 * GB);
    assert_eq!(p.weight_bytes_per_gpu, 35_278_831_616);
    // 35.28 GB + 2 GiB > 36 GB usable.
    assert!(matches!(p.reasons[..], [Misfit::WeightsTooBig { .. }]));
    let p = plan(&spec(4, 8), &llama3_70b(), 80 * GB);
    // 72,000,000,000 − 35,278,831,616 − 2,147,483,648 = 34,573,684,736;
    // 2 local KV heads → 81,920 per token → 422,042 tokens.
    assert_eq!(p.kv_cache_bytes_per_gpu, 34_573_684_736);
    assert_eq!(p.kv_bytes_per_token_per_gpu, 81_920);
    assert_eq!(p.max_context_tokens, 422_042);
    let p = plan(&spec(4, 8), &llama3_70b(), 141 * GB);
    // 126,900,000,000 − 35,278,831,616 − 2,147,483,648 = 89,473,684,736.
    assert_eq!(p.max_context_tokens, 1_092_208);
    assert_eq!((p.pods_per_group, p.gpus_per_pod), (1, 4));
}

#[test]
fn llama3_70b_tp8_on_every_gpu_size() {
    // Rank: 8,820,367,360 weights × 2 = 17,640,734,720; one local KV head:
    // 2 × 80 × 1 × 128 × 2 = 40,960 bytes per token.
    let cases = [
        // 36e9 − 17,640,734,720 − 2 GiB = 16,211,781,632 → 395,795 tokens.
        (40 * GB, 16_211_781_632, 395_795),
        // 72e9 − … = 52,211,781,632 → 1,274,701 tokens.
        (80 * GB, 52_211_781_632, 1_274_701),
        // 126.9e9 − … = 107,111,781,632 → 2,615,033 tokens.
        (141 * GB, 107_111_781_632, 2_615_033),
    ];
    for (gpu, kv, tokens) in cases {
        let p = plan(&spec(8, 8), &llama3_70b(), gpu);
        assert_eq!(p.weight_bytes_per_gpu, 17_640_734_720);
        assert_eq!(p.kv_bytes_per_token_per_gpu, 40_960);
        assert_eq!(
            (p.kv_cache_bytes_per_gpu, p.max_context_tokens),
            (kv, tokens)
        );
        assert!(p.fits());
    }
}

#[test]
fn tp8_on_nodes_of_four_gpus_spans_two_pods() {
    let p = plan(&spec(8, 4), &llama3_70b(), 80 * GB);
    assert_eq!(
        (p.pods_per_group, p.ranks_per_pod, p.gpus_per_pod),
        (2, 4, 4)
    );
    // Memory per GPU does not depend on how ranks are packed into pods.
    assert_eq!(p.max_context_tokens, 1_274_701);
    assert!(p.fits());
    let p = plan(&spec(8, 8), &llama3_70b(), 80 * GB);
    assert_eq!(
        (p.pods_per_group, p.ranks_per_pod, p.gpus_per_pod),
        (1, 8, 8)
    );
}

#[test]
fn replicas_become_groups() {
    let mut s = spec(4, 4);
    s.replicas = 3;
    let p = plan(&s, &llama3_70b(), 80 * GB);
    assert_eq!((p.groups, p.pods_per_group, p.gpus_per_pod), (3, 1, 4));
}

#[test]
fn kv_heads_are_replicated_beyond_their_count() {
    // TP 16 over 8 KV heads: each rank still holds one KV head (replicated
    // twice), so KV per token stays 40,960 like TP 8.
    let p = plan(&spec(16, 8), &llama3_70b(), 80 * GIB);
    assert_eq!(p.kv_bytes_per_token_per_gpu, 40_960);
    assert_eq!(p.pods_per_group, 2);
    assert!(p.fits(), "{:?}", p.reasons);
}

#[test]
fn smollm2_demo_on_one_gpu() {
    let p = plan(&spec(1, 8), &smollm2(), 80 * GIB);
    // 134,515,008 × 0.625 = 84,071,880 bytes.
    assert_eq!(p.weight_bytes_per_gpu, 84_071_880);
    // 77,309,411,328 − 84,071,880 − 2,147,483,648 = 75,077,855,800.
    assert_eq!(p.kv_cache_bytes_per_gpu, 75_077_855_800);
    // 2 × 30 × 3 × 64 × 2 = 23,040 per token → 3,258,587 tokens.
    assert_eq!(p.kv_bytes_per_token_per_gpu, 23_040);
    assert_eq!(p.max_context_tokens, 3_258_587);
    assert!(p.fits());
}

#[test]
fn smollm2_allows_tp3_and_refuses_tp2_and_tp4() {
    let p = plan(&spec(3, 8), &smollm2(), 80 * GIB);
    // One KV head per rank: 2 × 30 × 1 × 64 × 2 = 7,680 per token;
    // 44,861,760 weights per rank × 0.625 = 28,038,600 bytes.
    assert_eq!(p.kv_bytes_per_token_per_gpu, 7_680);
    assert_eq!(p.weight_bytes_per_gpu, 28_038_600);
    assert!(p.fits());
    let reasons: Vec<String> = plan(&spec(2, 8), &smollm2(), 80 * GIB)
        .reasons
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        reasons,
        [
            "spec.tensor: 2 does not divide the 9 attention heads",
            "spec.tensor: 2 neither divides nor is a multiple of the 3 KV heads",
        ]
    );
    let p = plan(&spec(4, 8), &smollm2(), 80 * GIB);
    assert_eq!(p.reasons.len(), 2, "{:?}", p.reasons);
}

#[test]
fn impossible_gpu_layouts_are_refused() {
    let mut s = spec(1, 4);
    s.gpu.per_rank = 8;
    let p = plan(&s, &llama3_8b(), 80 * GIB);
    assert_eq!(
        p.reasons,
        [Misfit::RankWiderThanNode {
            per_rank: 8,
            per_node: 4
        }]
    );
    // Nodes of 6 GPUs hold 3 ranks of 2 GPUs; 8 ranks do not split evenly.
    let mut s = spec(8, 6);
    s.gpu.per_rank = 2;
    let p = plan(&s, &llama3_70b(), 141 * GB);
    assert_eq!(
        p.reasons,
        [Misfit::UnevenPods {
            tensor: 8,
            ranks_per_node: 3
        }]
    );
}

#[test]
fn max_seq_len_beyond_the_kv_cache_is_refused() {
    let mut s = spec(8, 8);
    s.engine.max_seq_len = Some(2_000_000);
    let p = plan(&s, &llama3_70b(), 80 * GB);
    assert_eq!(
        p.reasons[0].to_string(),
        "spec.engine.maxSeqLen: 2000000 tokens exceed the 1274701 the KV cache holds"
    );
}

#[test]
fn engine_settings_change_the_budget() {
    let mut s = spec(1, 8);
    s.engine.gpu_memory_utilization_percent = Some(50);
    s.engine.kv_cache_dtype = Some(crate::crd::KvCacheDtype::Fp8);
    let p = plan(&s, &llama3_8b(), 80 * GIB);
    // 42,949,672,960 (40 GiB) − 16,060,522,496 − 2,147,483,648 =
    // 24,741,666,816; fp8 halves KV per token to 65,536 → 377,527 tokens.
    assert_eq!(p.kv_cache_bytes_per_gpu, 24_741_666_816);
    assert_eq!(p.max_context_tokens, 377_527);
}

#[test]
fn dtype_supplies_bytes_per_weight_when_the_shape_does_not() {
    let mut s = smollm2_shape_spec();
    s.bytes_per_weight = None;
    assert_eq!(
        Shape::from_spec(&s, Some(WeightDtype::Q4_1)).bytes_per_weight,
        0.625
    );
    assert_eq!(Shape::from_spec(&s, None).bytes_per_weight, 2.0);
    assert_eq!(Shape::from_spec(&s, None).head_dim, 64);
}

fn smollm2_shape_spec() -> ModelShape {
    ModelShape {
        layers: 30,
        hidden_size: 576,
        heads: 9,
        kv_heads: Some(3),
        head_dim: None,
        vocab_size: 49_152,
        intermediate_size: 1536,
        tied_embeddings: true,
        bytes_per_weight: Some(0.625),
    }
}
