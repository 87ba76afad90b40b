//! Adapters in the engine, on the demo model: each request runs with its own,
//! batched with others and the base; the prefix cache keeps them apart; one slot
//! is shared in turns; unloading lets running requests finish.

use std::collections::HashMap;

use super::super::*;
use crate::lora::Target;
use crate::lora::testing::TestAdapter;
use shardserve_e2e::demo_model;

fn load(options: EngineOptions) -> Engine {
    let path = demo_model();
    Engine::load(&path, &options)
        .unwrap_or_else(|e| panic!("cannot load the demo model {}: {e}", path.display()))
}

/// A random adapter of Q and V for the engine's model, in a fresh directory.
fn adapter(engine: &Engine, seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    TestAdapter::random(&engine.info().config, 4, &[Target::Q, Target::V], seed).write_peft(
        dir.path(),
        &engine.info().config,
        serde_json::json!({}),
    );
    dir
}

fn request(adapter: Option<&str>) -> GenerationRequest {
    let mut req = GenerationRequest::new(Prompt::Text(
        "The quick brown fox jumps over the lazy dog. Once upon a time".into(),
    ));
    req.stopping.max_tokens = Some(8);
    req.stopping.ignore_eos = true;
    req.adapter = adapter.map(str::to_string);
    req
}

fn alone(engine: &mut Engine, adapter: Option<&str>) -> Vec<u32> {
    engine
        .generate(&request(adapter), &mut |_| Flow::Continue)
        .unwrap()
        .unwrap()
        .token_ids
}

/// Adds one request per entry at once and steps until all end.
fn together(engine: &mut Engine, adapters: &[Option<&str>]) -> Vec<Vec<u32>> {
    let ids: Vec<SeqId> = adapters
        .iter()
        .map(|a| engine.add(request(*a)).unwrap())
        .collect();
    let mut done: HashMap<SeqId, Vec<u32>> = HashMap::new();
    while engine.has_work() {
        for StepEvent { seq, event } in engine.step().unwrap() {
            match event {
                EngineEvent::Finished(f) => {
                    done.insert(seq, f.token_ids);
                }
                EngineEvent::Error(e) => panic!("request {seq} failed: {e}"),
                EngineEvent::Token(_) => {}
            }
        }
    }
    ids.iter().map(|id| done.remove(id).unwrap()).collect()
}

#[test]
fn requests_run_with_their_adapter_batched_and_the_prefix_cache_keeps_them_apart() {
    let mut engine = load(EngineOptions::default());
    let (a, b) = (adapter(&engine, 1), adapter(&engine, 2));
    let info = engine.load_adapter("a", a.path()).unwrap();
    assert_eq!((info.rank, info.resident), (4, true));
    engine.load_adapter("b", b.path()).unwrap();

    let base = alone(&mut engine, None);
    let with_a = alone(&mut engine, Some("a"));
    let with_b = alone(&mut engine, Some("b"));
    assert_ne!(with_a, base);
    assert_ne!(with_a, with_b);
    // The same prompt again, every block of it cached under each: each gets its own.
    assert_eq!(
        together(&mut engine, &[Some("b"), None, Some("a"), Some("b")]),
        [with_b.clone(), base, with_a, with_b]
    );
    let err = engine.add(request(Some("c"))).unwrap_err();
    assert!(
        matches!(err, EngineError::UnknownAdapter(ref n) if n == "c"),
        "{err}"
    );
    let names: Vec<String> = engine.adapters().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn with_one_slot_adapters_take_turns_and_none_in_use_is_evicted() {
    let mut engine = load(EngineOptions {
        max_loras: 1,
        ..EngineOptions::default()
    });
    let (a, b) = (adapter(&engine, 1), adapter(&engine, 2));
    engine.load_adapter("a", a.path()).unwrap();
    let info = engine.load_adapter("b", b.path()).unwrap();
    assert!(info.resident, "a was idle: b took its slot");
    let listed: Vec<(String, bool)> = engine
        .adapters()
        .into_iter()
        .map(|a| (a.name, a.resident))
        .collect();
    assert_eq!(listed, [("a".into(), false), ("b".into(), true)]);
    let with_a = alone(&mut engine, Some("a"));
    let with_b = alone(&mut engine, Some("b"));
    assert_eq!(
        together(&mut engine, &[Some("a"), Some("b"), None, Some("a")]),
        [with_a.clone(), with_b, alone(&mut engine, None), with_a]
    );
    assert_eq!(engine.stats().kv_blocks_used, 0, "every block came back");
}

#[test]
fn an_unloaded_adapter_finishes_its_requests_and_refuses_new_ones() {
    let mut engine = load(EngineOptions::default());
    let a = adapter(&engine, 1);
    engine.load_adapter("a", a.path()).unwrap();
    let want = alone(&mut engine, Some("a"));
    let seq = engine.add(request(Some("a"))).unwrap();
    engine.step().unwrap();
    assert!(matches!(
        engine.load_adapter("a", a.path()),
        Err(EngineError::AdapterBusy(_))
    ));
    engine.unload_adapter("a").unwrap();
    assert!(engine.adapters().is_empty());
    assert!(matches!(
        engine.add(request(Some("a"))),
        Err(EngineError::UnknownAdapter(_))
    ));
    let mut got = Vec::new();
    while engine.has_work() {
        for e in engine.step().unwrap() {
            if let (true, EngineEvent::Finished(f)) = (e.seq == seq, e.event) {
                got = f.token_ids;
            }
        }
    }
    assert_eq!(got, want, "the running request finished with its adapter");
    assert!(matches!(
        engine.unload_adapter("a"),
        Err(EngineError::UnknownAdapter(_))
    ));
    // Loaded again under the same name, it serves again.
    engine.load_adapter("a", a.path()).unwrap();
    assert_eq!(alone(&mut engine, Some("a")), want);
}

#[test]
fn a_bad_adapter_is_refused_by_file_and_tensor_and_the_engine_keeps_serving() {
    let mut engine = load(EngineOptions {
        max_lora_rank: 2,
        ..EngineOptions::default()
    });
    let a = adapter(&engine, 1);
    let err = engine.load_adapter("a", a.path()).unwrap_err();
    assert!(matches!(err, EngineError::Adapter(_)), "{err}");
    assert!(err.to_string().contains("above --max-lora-rank 2"), "{err}");
    let model_file = demo_model();
    let err = engine.load_adapter("m", &model_file).unwrap_err();
    assert!(err.to_string().contains("not a LoRA adapter"), "{err}");
    let name = engine.info().served_model_name.clone();
    assert!(matches!(
        engine.load_adapter(&name, a.path()),
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(engine.adapters().is_empty());
    assert_eq!(alone(&mut engine, None).len(), 8);
}

fn own_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
}

#[test]
fn a_tensor_3_group_loads_its_adapter_on_every_rank_and_answers_as_tensor_1() {
    let mut one = load(EngineOptions::default());
    let a = adapter(&one, 5);
    one.load_adapter("a", a.path()).unwrap();
    let want = alone(&mut one, Some("a"));
    drop(one);

    let path = demo_model();
    let mut comms = crate::comm::LocalGroup::new(3).into_iter();
    let leader_comm = comms.next().unwrap();
    let followers: Vec<_> = comms
        .map(|comm| {
            let path = path.clone();
            std::thread::spawn(move || {
                // Each rank on a pool of its own, as a rank process would be.
                own_pool().install(|| {
                    let mut engine = Engine::load_rank(
                        &path,
                        &EngineOptions::default(),
                        comm,
                        crate::device::Compute::Host,
                    )
                    .unwrap();
                    engine.agree_on_kv_cache().unwrap();
                    engine.follow()
                })
            })
        })
        .collect();
    own_pool().install(|| {
        let mut leader = Engine::load_rank(
            &path,
            &EngineOptions::default(),
            leader_comm,
            crate::device::Compute::Host,
        )
        .unwrap();
        leader.agree_on_kv_cache().unwrap();
        leader.load_adapter("a", a.path()).unwrap();
        assert_eq!(alone(&mut leader, Some("a")), want, "tensor 3 differs");
        leader.unload_adapter("a").unwrap();
        assert!(matches!(
            leader.add(request(Some("a"))),
            Err(EngineError::UnknownAdapter(_))
        ));
        assert_eq!(alone(&mut leader, None).len(), 8, "the group still serves");
        leader.stop_group();
    });
    for f in followers {
        f.join().unwrap().unwrap();
    }
}
