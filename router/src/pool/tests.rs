use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::discovery::Backend;

fn deployment(model: &str, ids: &[&str]) -> Deployment {
    Deployment {
        model: model.into(),
        backends: ids
            .iter()
            .enumerate()
            .map(|(i, id)| Backend {
                id: (*id).into(),
                grpc_uri: format!("http://127.0.0.1:{}", 1 + i),
            })
            .collect(),
        adapters: Vec::new(),
    }
}

fn pool(max_queue: usize, deployments: &[Deployment]) -> Arc<Pool> {
    let metrics = Arc::new(Metrics::new().unwrap());
    let pool = Arc::new(Pool::new(
        metrics,
        PoolLimits {
            max_queue_per_backend: max_queue,
            max_held_per_model: 2,
            connect_timeout: Duration::from_millis(100),
            affinity_capacity: 16,
        },
        None,
    ));
    pool.update(deployments);
    pool
}

#[tokio::test]
async fn leases_spread_and_release_on_drop() {
    let pool = pool(4, &[deployment("m", &["a", "b"])]);
    let first = pool.lease("m", 1, &[]).unwrap();
    let second = pool.lease("m", 2, &[]).unwrap();
    assert_ne!(first.backend, second.backend);
    drop(first);
    drop(second);
    assert!(pool.snapshot("m").iter().all(|(_, n, _)| *n == 0));
}

#[tokio::test]
async fn queue_limit_gives_overloaded_then_recovers() {
    let pool = pool(1, &[deployment("m", &["a", "b"])]);
    let a = pool.lease("m", 1, &[]).unwrap();
    let b = pool.lease("m", 2, &[]).unwrap();
    assert_eq!(
        pool.lease("m", 3, &[]).err(),
        Some(PickError::Overloaded("m".into()))
    );
    drop(a);
    assert!(pool.lease("m", 3, &[]).is_ok());
    drop(b);
}

#[tokio::test]
async fn the_same_prefix_goes_back_to_the_same_backend() {
    let pool = pool(8, &[deployment("m", &["a", "b", "c"])]);
    let first = pool.lease("m", 42, &[]).unwrap().backend.clone();
    for _ in 0..5 {
        assert_eq!(pool.lease("m", 42, &[]).unwrap().backend, first);
    }
}

#[tokio::test]
async fn failed_backends_are_ejected_and_excluded() {
    let pool = pool(8, &[deployment("m", &["a", "b"])]);
    pool.report_failure("m", "a", "connection refused");
    for key in 0..4 {
        assert_eq!(pool.lease("m", key, &[]).unwrap().backend, "b");
    }
    assert_eq!(
        pool.lease("m", 9, &["b".into()]).err(),
        Some(PickError::NoHealthy("m".into()))
    );
    pool.report_check("m", "a", true, None);
    assert_eq!(pool.models()[0].healthy, 1);
}

#[tokio::test]
async fn two_failed_checks_eject_one_does_not() {
    let pool = pool(8, &[deployment("m", &["a"])]);
    pool.report_check("m", "a", false, None);
    assert!(pool.snapshot("m")[0].2);
    pool.report_check("m", "a", false, None);
    assert!(!pool.snapshot("m")[0].2);
    pool.report_check("m", "a", true, None);
    assert!(pool.snapshot("m")[0].2);
}

#[tokio::test]
async fn models_resolve_by_name_or_as_the_only_one() {
    let one = pool(8, &[deployment("m", &["a"])]);
    assert_eq!(one.resolve_model("").unwrap(), "m");
    assert_eq!(one.resolve_model("m").unwrap(), "m");
    assert_eq!(
        one.resolve_model("x").err(),
        Some(PickError::UnknownModel("x".into()))
    );
    let two = pool(8, &[deployment("m", &["a"]), deployment("n", &["b"])]);
    assert!(matches!(
        two.resolve_model(""),
        Err(PickError::ModelRequired(_))
    ));
    assert_eq!(two.resolve_model("n").unwrap(), "n");
}

#[tokio::test]
async fn updates_keep_the_state_of_backends_that_stay() {
    let pool = pool(8, &[deployment("m", &["a", "b"])]);
    let lease = pool.lease("m", 1, &["b".into()]).unwrap();
    assert_eq!(lease.backend, "a");
    pool.update(&[deployment("m", &["a"])]);
    assert_eq!(pool.snapshot("m"), [("a".to_string(), 1, true)]);
    drop(lease);
    assert_eq!(pool.snapshot("m"), [("a".to_string(), 0, true)]);
    pool.update(&[]);
    assert!(pool.models().is_empty());
}

#[tokio::test]
async fn a_known_model_without_backends_is_no_backends_not_unknown() {
    let pool = pool(8, &[deployment("starting", &[])]);
    assert_eq!(pool.resolve_model("starting").unwrap(), "starting");
    assert_eq!(
        pool.lease("starting", 1, &[]).err(),
        Some(PickError::NoBackends("starting".into()))
    );
    assert_eq!(pool.models()[0].backends, 0);
    pool.update(&[deployment("starting", &["a"])]);
    assert_eq!(pool.lease("starting", 1, &[]).unwrap().backend, "a");
}

/// The outstanding gauge of `backend`, as `/metrics` shows it (`None`: no series).
fn outstanding_gauge(pool: &Pool, model: &str, backend: &str) -> Option<i64> {
    use prometheus::core::Collector;
    pool.metrics.outstanding.collect()[0]
        .get_metric()
        .iter()
        .find(|m| {
            let value = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_string())
            };
            value("model").as_deref() == Some(model) && value("backend").as_deref() == Some(backend)
        })
        .map(|m| m.get_gauge().get_value() as i64)
}

#[tokio::test]
async fn a_backend_dropped_by_discovery_is_counted_until_its_requests_end() {
    let pool = pool(8, &[deployment("m", &["a", "b"])]);
    let on_a: Vec<Lease> = (0..8)
        .filter_map(|key| pool.lease("m", key, &[]).ok())
        .filter(|l| l.backend == "a")
        .collect();
    let running = on_a.len() as i64;
    assert!(running > 0);
    // Group "a" drains: discovery lists only "b".
    pool.update(&[deployment("m", &["b"])]);
    for key in 0..8 {
        assert_eq!(pool.lease("m", key, &[]).unwrap().backend, "b");
    }
    assert_eq!(outstanding_gauge(&pool, "m", "a"), Some(running));
    let mut on_a = on_a;
    let last = on_a.pop().unwrap();
    drop(on_a);
    assert_eq!(outstanding_gauge(&pool, "m", "a"), Some(1));
    drop(last);
    assert_eq!(outstanding_gauge(&pool, "m", "a"), None, "gone when idle");

    // A whole model removed while a request runs on it: counted the same way.
    let held = pool.lease("m", 1, &[]).unwrap();
    pool.update(&[]);
    assert_eq!(outstanding_gauge(&pool, "m", "b"), Some(1));
    drop(held);
    assert_eq!(outstanding_gauge(&pool, "m", "b"), None);
}

fn serving(adapters: &[(&str, bool)]) -> ModelInfoResponse {
    ModelInfoResponse {
        adapters: adapters
            .iter()
            .map(|(name, resident)| shardserve_proto::v1::LoraAdapter {
                name: (*name).into(),
                resident: *resident,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn adapter_requests_go_where_it_is_served_resident_first_then_by_load() {
    let pool = pool(2, &[deployment("m", &["a", "b", "c"])]);
    pool.report_info("m", "a", serving(&[("x", false)]));
    pool.report_info("m", "b", serving(&[("x", true)]));
    pool.report_info("m", "c", serving(&[]));
    assert_eq!(
        pool.resolve("x").unwrap(),
        Target {
            model: "m".into(),
            adapter: Some("x".into())
        }
    );
    assert_eq!(pool.resolve("m").unwrap().adapter, None);
    let first = pool.lease_for("m", Some("x"), 1, &[]).unwrap();
    let second = pool.lease_for("m", Some("x"), 2, &[]).unwrap();
    assert_eq!(
        (first.backend.as_str(), second.backend.as_str()),
        ("b", "b")
    );
    // b is full: a serves it too (it loads the adapter); c never does.
    let third = pool.lease_for("m", Some("x"), 3, &[]).unwrap();
    assert_eq!(third.backend, "a");
    let fourth = pool.lease_for("m", Some("x"), 4, &[]).unwrap();
    assert_eq!(fourth.backend, "a");
    assert_eq!(
        pool.lease_for("m", Some("x"), 5, &[]).err(),
        Some(PickError::Overloaded("m".into()))
    );
    assert_eq!(pool.lease("m", 6, &[]).unwrap().backend, "c");
    assert_eq!(
        pool.lease_for("m", Some("y"), 7, &[]).err(),
        Some(PickError::UnknownModel("y".into()))
    );
    assert!(matches!(
        pool.resolve_adapter("m", "y"),
        Err(PickError::UnknownAdapter { .. })
    ));
    let listed = &pool.models()[0].adapters;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "x");
}

#[tokio::test]
async fn a_declared_adapter_is_held_until_backends_report_then_their_word_counts() {
    let mut d = deployment("m", &["a"]);
    d.adapters = vec!["sql".into()];
    let pool = pool(2, &[d]);
    // No backend has said what it serves (starting): known, and held.
    let target = pool.resolve("sql").unwrap();
    assert_eq!(target.model, "m");
    assert_eq!(
        pool.lease_for("m", Some("sql"), 1, &[]).err(),
        Some(PickError::NoBackends("m".into()))
    );
    assert!(pool.resolve_adapter("m", "sql").is_ok());
    let listed = &pool.models()[0].adapters;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].name, "sql");
    // It reports it: routed there.
    pool.report_info("m", "a", serving(&[("sql", true)]));
    assert_eq!(
        pool.lease_for("m", Some("sql"), 2, &[]).unwrap().backend,
        "a"
    );
    // Unloaded at run time: unknown (404), not held, and no longer listed.
    pool.report_info("m", "a", serving(&[]));
    assert_eq!(
        pool.lease_for("m", Some("sql"), 3, &[]).err(),
        Some(PickError::UnknownModel("sql".into()))
    );
    assert!(pool.resolve("sql").is_err());
    assert!(pool.models()[0].adapters.is_empty());
}
