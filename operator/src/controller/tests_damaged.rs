//! Damaged manifests never panic: every scalar of every example, replaced by a number at
//! or past the edges of the integer types, a negative, a string, null or a boolean, is
//! either refused (parse, validation, planning) or builds its objects.

use std::path::PathBuf;

use serde_norway::Value;

use super::check::check;
use super::desired::{WorkerSettings, desired};
use crate::crd::ModelDeployment;
use crate::parse_manifests;

/// Every path to a scalar in `value`, as mapping keys and sequence indices.
fn scalar_paths(value: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                path.push(k.clone());
                scalar_paths(v, path, out);
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Value::Number(i.into()));
                scalar_paths(v, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn at<'v>(value: &'v mut Value, path: &[Value]) -> &'v mut Value {
    path.iter().fold(value, |v, key| match (v, key) {
        (Value::Sequence(items), Value::Number(i)) => &mut items[i.as_u64().unwrap() as usize],
        (v, key) => v.get_mut(key).unwrap(),
    })
}

/// `md` as the API server returns it: with a uid and a namespace.
fn applied(mut md: ModelDeployment) -> ModelDeployment {
    md.metadata.uid = Some("0d7c4f1e-uid".into());
    md.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    md
}

#[test]
fn damaged_example_manifests_are_refused_or_build_never_panic() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let damages: Vec<Value> = [
        "0",
        "-1",
        "4294967295",
        "4294967296",
        "18446744073709551615",
        "1e300",
        "\"x\"",
        "\"999999999999Ti\"",
        "null",
        "true",
        "[]",
    ]
    .iter()
    .map(|text| serde_norway::from_str(text).unwrap())
    .collect();
    let settings = WorkerSettings {
        image: "shardserve:test".into(),
        hub_endpoint: None,
        cuda: true,
        network: Some(crate::controller::desired::NetworkPeers {
            router: "shardserve:app=router".parse().unwrap(),
            operator: "shardserve:app=operator".parse().unwrap(),
            scrapers: vec!["*:app=prometheus".parse().unwrap()],
        }),
    };
    let (mut built, mut refused) = (0, 0);
    let mut files = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let good: Value = serde_norway::from_str(&text).unwrap();
        let undamaged = serde_norway::to_string(&good).unwrap();
        for md in parse_manifests(&undamaged).unwrap() {
            let topology = check(&md).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            desired(&applied(md), &topology, &settings).unwrap();
        }
        let mut paths = Vec::new();
        scalar_paths(&good, &mut Vec::new(), &mut paths);
        for leaf in &paths {
            for damage in &damages {
                let mut doc = good.clone();
                *at(&mut doc, leaf) = damage.clone();
                let text = serde_norway::to_string(&doc).unwrap();
                let outcome = std::panic::catch_unwind(|| -> Result<(), String> {
                    let mds = parse_manifests(&text).map_err(|e| e.to_string())?;
                    for md in &mds {
                        let topology = check(md).map_err(|e| e.to_string())?;
                        desired(&applied(md.clone()), &topology, &settings)
                            .map_err(|e| e.to_string())?;
                    }
                    Ok(())
                });
                match outcome {
                    Ok(Ok(())) => built += 1,
                    Ok(Err(_)) => refused += 1,
                    Err(_) => panic!("{}: {leaf:?} = {damage:?} panicked", path.display()),
                }
            }
        }
    }
    assert!(files >= 4, "examples read: {files}");
    assert!(built > 0 && refused > 0, "built {built}, refused {refused}");
}
