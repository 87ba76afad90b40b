//! Every manifest in `examples/` passes the generated CRD's OpenAPI schema
//! (the structural subset the API server checks before CEL rules) and the
//! operator's own validation.

use kube::CustomResourceExt;
use serde_json::Value;
use shardserve_operator::{ModelDeployment, parse_manifests};

fn examples() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            (
                p.display().to_string(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn schema() -> Value {
    let crd = serde_json::to_value(ModelDeployment::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// Checks `value` against `schema`, pushing one message per problem.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let mut fail = |m: String| errors.push(format!("{path}: {m}"));
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            fail("null where a value is required".into());
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            fail(format!("{value} is neither an integer nor a string"));
        }
        return;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        fail(format!("{value} is not one of {options:?}"));
    }
    let number = |k: &str| schema[k].as_f64();
    match schema["type"].as_str() {
        Some("object") => {
            let Some(map) = value.as_object() else {
                return fail(format!("{value} is not an object"));
            };
            for key in schema["required"].as_array().into_iter().flatten() {
                if !map.contains_key(key.as_str().unwrap()) {
                    fail(format!("missing required field {key}"));
                }
            }
            let props = schema["properties"].as_object();
            for (k, v) in map {
                let sub = format!("{path}.{k}");
                match (
                    props.and_then(|p| p.get(k)),
                    &schema["additionalProperties"],
                ) {
                    (Some(s), _) => check(s, v, &sub, errors),
                    (None, extra) if extra.is_object() => check(extra, v, &sub, errors),
                    (None, _) if schema["x-kubernetes-preserve-unknown-fields"] == true => {}
                    (None, _) => errors.push(format!("{sub}: unknown field")),
                }
            }
        }
        Some("array") => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    check(&schema["items"], item, &format!("{path}[{i}]"), errors);
                }
            }
            None => fail(format!("{value} is not an array")),
        },
        Some("string") => match value.as_str() {
            Some(s) => {
                let len = s.chars().count() as f64;
                if number("minLength").is_some_and(|m| len < m)
                    || number("maxLength").is_some_and(|m| len > m)
                {
                    fail(format!("{s:?} has a length out of bounds"));
                }
            }
            None => fail(format!("{value} is not a string")),
        },
        Some(kind @ ("integer" | "number")) => match value.as_f64() {
            Some(x) if kind == "integer" && !(value.is_i64() || value.is_u64()) => {
                fail(format!("{x} is not an integer"))
            }
            Some(x) => {
                if number("minimum").is_some_and(|m| x < m)
                    || number("maximum").is_some_and(|m| x > m)
                {
                    fail(format!("{x} is out of bounds"));
                }
            }
            None => fail(format!("{value} is not a number")),
        },
        Some("boolean") if !value.is_boolean() => fail(format!("{value} is not a boolean")),
        _ => {}
    }
}

/// The API server checks `apiVersion`, `kind` and `metadata` itself; the
/// schema covers the rest.
fn schema_errors(doc: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let mut body = doc.clone();
    if let Some(map) = body.as_object_mut() {
        if map.remove("apiVersion") != Some("shardserve.io/v1alpha1".into()) {
            errors.push("apiVersion: not shardserve.io/v1alpha1".into());
        }
        if map.remove("kind") != Some("ModelDeployment".into()) {
            errors.push("kind: not ModelDeployment".into());
        }
        map.remove("metadata");
    }
    check(&schema(), &body, "", &mut errors);
    errors
}

#[test]
fn every_example_passes_the_crd_schema_and_validation() {
    let examples = examples();
    assert!(examples.len() >= 3, "{examples:?}");
    for (path, text) in examples {
        let doc: Value = serde_norway::from_str(&text).unwrap();
        let errors = schema_errors(&doc);
        assert!(errors.is_empty(), "{path}: {errors:#?}");
        parse_manifests(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

#[test]
fn the_schema_check_refuses_what_the_api_server_would() {
    let (_, text) = &examples()[0];
    let mut doc: Value = serde_norway::from_str(text).unwrap();
    doc["spec"]["tensor"] = 0.into();
    doc["spec"]["gpu"] = serde_json::json!({"perRank": "two"});
    doc["spec"]["model"]["dtype"] = "float64".into();
    doc["spec"]["unknown"] = true.into();
    let errors = schema_errors(&doc).join("\n");
    for expected in [
        ".spec.tensor: 0 is out of bounds",
        ".spec.gpu.perRank: \"two\" is not a number",
        ".spec.model.dtype: \"float64\" is not one of",
        ".spec.unknown: unknown field",
    ] {
        assert!(errors.contains(expected), "{expected} not in\n{errors}");
    }
}

#[test]
fn cel_rules_and_list_keys_are_in_the_schema() {
    let spec = &schema()["properties"]["spec"];
    let rules: Vec<&str> = spec["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules.len(), 2, "{rules:?}");
    let gpu_rule = &spec["properties"]["gpu"]["x-kubernetes-validations"][0]["rule"];
    assert_eq!(gpu_rule, "self.perRank <= self.perNode");
    let autoscaling = &spec["properties"]["autoscaling"]["x-kubernetes-validations"][0]["rule"];
    assert_eq!(autoscaling, "self.minReplicas <= self.maxReplicas");
    assert_eq!(
        spec["properties"]["loraAdapters"]["x-kubernetes-list-map-keys"][0],
        "name"
    );
    let crd = ModelDeployment::crd();
    let version = &crd.spec.versions[0];
    let scale = version
        .subresources
        .as_ref()
        .unwrap()
        .scale
        .as_ref()
        .unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        columns,
        ["Model", "TP", "Replicas", "Ready", "Progress", "Age"]
    );
}
