//! Downloads against a fake Hub: a real HTTP server on 127.0.0.1 (axum)
//! serving the listing and resolve endpoints for a few tiny repositories,
//! and recording every request it gets.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::*;

const SHA: &str = "5f0d2b1c9a";
const TOKEN: &str = "secret";
/// Served with a longer Content-Length than it sends before dropping the
/// connection.
const BROKEN: &str = "broken.gguf";

struct Repo {
    gated: bool,
    /// Lists a wrong sha256 for every LFS file.
    lies: bool,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn tiny_files() -> Vec<(&'static str, Vec<u8>)> {
    let index = json!({
        "metadata": {"total_size": 7096},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors",
        }
    });
    vec![
        (
            "config.json",
            br#"{"architectures":["LlamaForCausalLM"]}"#.to_vec(),
        ),
        ("tokenizer.json", br#"{"model":{}}"#.to_vec()),
        ("tokenizer_config.json", br#"{"bos_token":"<s>"}"#.to_vec()),
        (INDEX, index.to_string().into_bytes()),
        ("model-00001-of-00002.safetensors", bytes(4096, 1)),
        ("model-00002-of-00002.safetensors", bytes(3000, 2)),
        // Not named by the index: a second copy of the weights.
        ("consolidated.safetensors", bytes(2048, 3)),
        ("README.md", b"# tiny".to_vec()),
        ("pytorch_model.bin", bytes(512, 4)),
        ("m.Q4_1.gguf", bytes(1500, 5)),
        ("onnx/model.safetensors", bytes(700, 6)),
        (BROKEN, bytes(4096, 7)),
    ]
}

/// The tiny repository with Llama-3-8B's `config.json` (what `plan` reads).
fn llama_files() -> Vec<(&'static str, Vec<u8>)> {
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
        "tie_word_embeddings": false,
    });
    let mut files = tiny_files();
    files[0] = ("config.json", config.to_string().into_bytes());
    files
}

fn is_lfs(name: &str) -> bool {
    [".safetensors", ".gguf", ".bin"]
        .iter()
        .any(|s| name.ends_with(s))
}

fn listing(repo: &str, files: &Repo) -> serde_json::Value {
    let siblings: Vec<_> = files
        .files
        .iter()
        .map(|(name, data)| {
            let mut sibling = json!({"rfilename": name, "size": data.len()});
            if is_lfs(name) {
                let sha = if files.lies {
                    "00".repeat(32)
                } else {
                    crate::model::hex(&Sha256::digest(data))
                };
                sibling["lfs"] = json!({"sha256": sha, "size": data.len(), "pointerSize": 134});
            }
            sibling
        })
        .collect();
    json!({"id": repo, "sha": SHA, "siblings": siblings})
}

#[derive(Clone)]
struct Fake {
    repos: Arc<HashMap<&'static str, Repo>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn hub_error(status: StatusCode, code: &'static str) -> Response {
    (status, [("x-error-code", code)], "").into_response()
}

async fn serve(State(fake): State<Fake>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_string();
    fake.requests.lock().unwrap().push(path.clone());
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    let path = path.trim_start_matches('/');
    let (api, repo, revision, file) = match path.strip_prefix("api/models/") {
        Some(rest) => match rest.split('/').collect::<Vec<_>>()[..] {
            [org, name, "revision", revision] => (true, format!("{org}/{name}"), revision, None),
            _ => return hub_error(StatusCode::NOT_FOUND, "RepoNotFound"),
        },
        None => match path.splitn(5, '/').collect::<Vec<_>>()[..] {
            [org, name, "resolve", revision, file] => {
                (false, format!("{org}/{name}"), revision, Some(file))
            }
            _ => return hub_error(StatusCode::NOT_FOUND, "RepoNotFound"),
        },
    };
    let Some(files) = fake.repos.get(repo.as_str()) else {
        return hub_error(StatusCode::NOT_FOUND, "RepoNotFound");
    };
    if files.gated && !authorized {
        return hub_error(StatusCode::UNAUTHORIZED, "GatedRepo");
    }
    if revision != "main" && revision != SHA {
        return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    if api {
        return axum::Json(listing(&repo, files)).into_response();
    }
    let file = file.unwrap_or_default();
    let Some((_, data)) = files.files.iter().find(|(name, _)| *name == file) else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    if file == BROKEN {
        // A tenth of the file, a pause (so the client has the headers and
        // those bytes), then the connection drops.
        let head = Bytes::copy_from_slice(&data[..data.len() / 10]);
        let drop = futures::stream::once(async {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "dropped",
            ))
        });
        let chunks = futures::stream::iter([Ok(head)]).chain(drop);
        return (
            [(header::CONTENT_LENGTH, data.len().to_string())],
            Body::from_stream(chunks),
        )
            .into_response();
    }
    data.clone().into_response()
}

/// The fake Hub, running on its own runtime while the test (sync, like
/// `model fetch`) talks to it.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeHub {
    fn start() -> Self {
        let repo = |gated, lies, files| Repo { gated, lies, files };
        let repos = HashMap::from([
            ("org/tiny", repo(false, false, tiny_files())),
            ("org/gated", repo(true, false, tiny_files())),
            ("org/corrupt", repo(false, true, tiny_files())),
            ("org/llama-8b", repo(false, false, llama_files())),
        ]);
        let fake = Fake {
            repos: Arc::new(repos),
            requests: Arc::default(),
        };
        let requests = fake.requests.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(serve).with_state(fake);
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            endpoint,
            requests,
            _runtime: runtime,
        }
    }

    fn settings(&self, token: Option<&str>) -> HubSettings {
        HubSettings {
            endpoint: self.endpoint.clone(),
            token: token.map(String::from),
        }
    }

    /// The paths requested since the last call.
    fn take_requests(&self) -> Vec<String> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

fn model<'a>(repo: &'a str, revision: &'a str, file: Option<&'a str>) -> HubModel<'a> {
    HubModel {
        repo,
        revision,
        file,
    }
}

fn served(name: &str) -> Vec<u8> {
    tiny_files()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, data)| data)
        .unwrap()
}

/// The files under `dir`, relative, the completion marker left out.
fn files_in(dir: &Path) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel != COMPLETE_MARKER {
                    found.insert(rel);
                }
            }
        }
    }
    found
}

const DIRECTORY: [&str; 6] = [
    "config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    INDEX,
    "tokenizer.json",
    "tokenizer_config.json",
];

#[test]
fn a_single_file_lands_in_the_cache_with_its_bytes() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    for file in ["m.Q4_1.gguf", "onnx/model.safetensors"] {
        let dest = cache.path().join("hf/org/tiny/main").join(file);
        let got = fetch(
            &hub.settings(None),
            &model("org/tiny", "main", Some(file)),
            &dest,
            Arc::default(),
        )
        .unwrap();
        assert_eq!(got, dest);
        assert_eq!(std::fs::read(&dest).unwrap(), served(file));
        assert_eq!(
            hub.take_requests(),
            [format!("/org/tiny/resolve/main/{file}")]
        );
    }
    // Only the two files, no partial left behind.
    assert_eq!(
        files_in(&cache.path().join("hf/org/tiny/main")),
        BTreeSet::from(["m.Q4_1.gguf".into(), "onnx/model.safetensors".into()])
    );
    // In place: no request at all.
    let dest = cache.path().join("hf/org/tiny/main/m.Q4_1.gguf");
    fetch(
        &hub.settings(None),
        &model("org/tiny", "main", Some("m.Q4_1.gguf")),
        &dest,
        Arc::default(),
    )
    .unwrap();
    assert!(hub.take_requests().is_empty());
}

#[test]
fn a_model_directory_takes_exactly_what_the_engine_loads() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("hf/org/tiny/main");
    fetch(
        &hub.settings(None),
        &model("org/tiny", "main", None),
        &dir,
        Arc::default(),
    )
    .unwrap();
    let expected: BTreeSet<String> = DIRECTORY.iter().map(|s| s.to_string()).collect();
    assert_eq!(files_in(&dir), expected);
    for name in DIRECTORY {
        assert_eq!(
            std::fs::read(dir.join(name)).unwrap(),
            served(name),
            "{name}"
        );
    }
    // The listing, then each file once, from the listed commit.
    let mut requests = hub.take_requests();
    assert_eq!(requests.remove(0), "/api/models/org/tiny/revision/main");
    let wanted: BTreeSet<String> = DIRECTORY
        .iter()
        .map(|name| format!("/org/tiny/resolve/{SHA}/{name}"))
        .collect();
    assert_eq!(requests.len(), wanted.len(), "{requests:?}");
    assert_eq!(requests.into_iter().collect::<BTreeSet<_>>(), wanted);
}

#[test]
fn a_second_fetch_downloads_nothing_and_a_third_only_what_is_missing() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("hf/org/tiny/main");
    let tiny = model("org/tiny", "main", None);
    let all: u64 = DIRECTORY.iter().map(|name| served(name).len() as u64).sum();
    let tally = Arc::new(Tally::default());
    fetch(&hub.settings(None), &tiny, &dir, tally.clone()).unwrap();
    assert_eq!(hub.take_requests().len(), 1 + DIRECTORY.len());
    // Every byte to fetch is counted from the listing, and every byte fetched.
    assert_eq!(tally.bytes(), (all, all));

    fetch(&hub.settings(None), &tiny, &dir, Arc::default()).unwrap();
    assert!(hub.take_requests().is_empty());

    // A lost shard: the listing, then that shard alone; the files in place count
    // as fetched.
    let shard = "model-00002-of-00002.safetensors";
    std::fs::remove_file(dir.join(shard)).unwrap();
    let tally = Arc::new(Tally::default());
    fetch(&hub.settings(None), &tiny, &dir, tally.clone()).unwrap();
    assert_eq!(tally.bytes(), (all, all));
    assert_eq!(
        hub.take_requests(),
        [
            "/api/models/org/tiny/revision/main".to_string(),
            format!("/org/tiny/resolve/{SHA}/{shard}"),
        ]
    );
    assert_eq!(std::fs::read(dir.join(shard)).unwrap(), served(shard));
}

#[test]
fn missing_repositories_revisions_and_files_are_404s_naming_the_url() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let cases = [
        (
            model("org/nope", "main", None),
            "/api/models/org/nope/revision/main",
        ),
        (
            model("org/tiny", "v9", None),
            "/api/models/org/tiny/revision/v9",
        ),
        (
            model("org/tiny", "main", Some("absent.gguf")),
            "/org/tiny/resolve/main/absent.gguf",
        ),
    ];
    for (m, path) in cases {
        let dest = cache.path().join("out").join(m.file.unwrap_or("dir"));
        let err = fetch(&hub.settings(None), &m, &dest, Arc::default()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, HubError::NotFound { .. }), "{text}");
        assert!(text.contains(&format!("{}{path}", hub.endpoint)), "{text}");
        assert!(text.contains("404") && text.contains("no such"), "{text}");
        assert!(!dest.exists());
    }
}

#[test]
fn gated_models_need_a_token() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let gated = model("org/gated", "main", Some("m.Q4_1.gguf"));
    let dest = cache.path().join("m.gguf");

    let err = fetch(&hub.settings(None), &gated, &dest, Arc::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::Denied { .. }), "{text}");
    assert!(text.contains("401") && text.contains("GatedRepo"), "{text}");
    assert!(text.contains("set HF_TOKEN"), "{text}");
    assert!(
        text.contains("/org/gated/resolve/main/m.Q4_1.gguf"),
        "{text}"
    );

    let err = fetch(&hub.settings(Some("wrong")), &gated, &dest, Arc::default()).unwrap_err();
    assert!(err.to_string().contains("token sent"), "{err}");
    assert!(!dest.exists());

    fetch(&hub.settings(Some(TOKEN)), &gated, &dest, Arc::default()).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), served("m.Q4_1.gguf"));
    // The directory too: the listing and files carry the token.
    let dir = cache.path().join("gated");
    fetch(
        &hub.settings(Some(TOKEN)),
        &model("org/gated", "main", None),
        &dir,
        Arc::default(),
    )
    .unwrap();
    assert_eq!(files_in(&dir).len(), DIRECTORY.len());
}

#[test]
fn a_dropped_connection_leaves_no_file() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let dest = cache.path().join("hf/org/tiny/main").join(BROKEN);
    let err = fetch(
        &hub.settings(None),
        &model("org/tiny", "main", Some(BROKEN)),
        &dest,
        Arc::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::Interrupted { .. }), "{text}");
    assert!(text.contains("broke off after 409 of 4096 bytes"), "{text}");
    assert!(text.contains(&format!("/resolve/main/{BROKEN}")), "{text}");
    assert!(!dest.exists(), "a truncated file at the final path");
    assert!(files_in(&cache.path().join("hf/org/tiny/main")).is_empty());
}

#[test]
fn a_file_whose_sha256_differs_from_the_listing_is_discarded() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("hf/org/corrupt/main");
    let err = fetch(
        &hub.settings(None),
        &model("org/corrupt", "main", None),
        &dir,
        Arc::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::Corrupt { .. }), "{text}");
    assert!(text.contains("sha256"), "{text}");
    assert!(!dir.join("model-00001-of-00002.safetensors").exists());
    assert!(!dir.join(COMPLETE_MARKER).exists());
}

#[test]
fn an_unreachable_hub_says_where_it_looked() {
    // A port nobody listens on any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let settings = HubSettings {
        endpoint: format!("http://127.0.0.1:{port}"),
        token: None,
    };
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(
        &settings,
        &model("org/tiny", "main", None),
        cache.path(),
        Arc::default(),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HubError::Unreachable { .. }), "{text}");
    assert!(
        text.contains(&format!(
            "cannot reach http://127.0.0.1:{port}/api/models/org/tiny"
        )),
        "{text}"
    );
    assert!(text.contains("HF_ENDPOINT"), "{text}");
}

#[test]
fn urls_keep_a_mirror_path_and_encode_file_names() {
    let settings = HubSettings {
        endpoint: "https://mirror.example/hf/".into(),
        token: None,
    };
    let hub = Hub::new(&settings, Arc::default()).unwrap();
    let url = hub
        .url(&resolve_segments("org/name", "main", "q/a b.gguf"))
        .unwrap();
    assert_eq!(
        url.as_str(),
        "https://mirror.example/hf/org/name/resolve/main/q/a%20b.gguf"
    );
    let bad = HubSettings {
        endpoint: "ftp://x".into(),
        token: None,
    };
    assert!(matches!(
        Hub::new(&bad, Arc::default()),
        Err(HubError::Endpoint { .. })
    ));
}

fn listing_of(names: &[&str]) -> Listing {
    Listing {
        sha: None,
        siblings: names
            .iter()
            .map(|n| Sibling {
                rfilename: n.to_string(),
                size: None,
                lfs: None,
            })
            .collect(),
    }
}

fn names(files: &[&Sibling]) -> Vec<String> {
    files.iter().map(|s| s.rfilename.clone()).collect()
}

#[test]
fn weights_follow_the_engine_rule() {
    let l = listing_of(&[
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "consolidated.safetensors",
        "sub/x.safetensors",
    ]);
    assert_eq!(
        names(&weight_files(&l, None).unwrap()),
        ["model.safetensors"]
    );
    let l = listing_of(&["b.safetensors", "a.safetensors", "sub/x.safetensors"]);
    assert_eq!(
        names(&weight_files(&l, None).unwrap()),
        ["b.safetensors", "a.safetensors"]
    );
    let index = Index {
        weight_map: BTreeMap::from([("t".into(), "../evil.safetensors".into())]),
    };
    let err = weight_files(&l, Some(&index)).unwrap_err();
    assert!(err.contains("../evil.safetensors"), "{err}");
}

#[test]
fn repositories_the_engine_cannot_load_are_refused_by_name() {
    let err = small_files(&listing_of(&[
        "config.json",
        "m.Q4_K_M.gguf",
        "m.Q8_0.gguf",
    ]))
    .unwrap_err();
    assert!(
        err.contains("name one GGUF file") && err.contains("m.Q8_0.gguf"),
        "{err}"
    );
    let err = small_files(&listing_of(&["config.json", "model.safetensors"])).unwrap_err();
    assert!(err.contains("tokenizer.json"), "{err}");
    let listing = listing_of(&[
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors",
        "README.md",
    ]);
    let ok = small_files(&listing).unwrap();
    assert_eq!(
        names(&ok),
        ["config.json", "tokenizer.json", "generation_config.json"]
    );
}

/// `shardserve plan` of an hf:// model directory without `spec.model.shape`
/// fetches the config alone, into the place the directory's fetch puts it.
#[test]
fn plan_fetches_only_the_config_of_an_hf_directory() {
    let hub = FakeHub::start();
    let cache = tempfile::tempdir().unwrap();
    let manifest = r#"
apiVersion: shardserve.io/v1alpha1
kind: ModelDeployment
metadata: {name: llama}
spec:
  model: {source: "hf://org/llama-8b"}
  tensor: 2
"#;
    let md = shardserve_operator::parse_manifests(manifest)
        .unwrap()
        .remove(0);
    let settings = hub.settings(None);
    let shape_of = || {
        crate::plan::shape_of(
            &md,
            Path::new("."),
            Some(cache.path().to_path_buf()),
            &settings,
        )
    };
    let shape = shape_of().unwrap();
    assert_eq!(
        (
            shape.layers,
            shape.hidden_size,
            shape.heads,
            shape.kv_heads,
            shape.head_dim
        ),
        (32, 4096, 32, 8, 128)
    );
    assert_eq!(
        (
            shape.vocab_size,
            shape.intermediate_size,
            shape.tied_embeddings
        ),
        (128256, 14336, false)
    );
    assert_eq!(shape.bytes_per_weight, 2.0);
    assert_eq!(
        hub.take_requests(),
        ["/org/llama-8b/resolve/main/config.json"]
    );
    assert_eq!(
        files_in(&cache.path().join("hf/org/llama-8b/main")),
        BTreeSet::from(["config.json".to_string()])
    );
    // Planned again: from the cache, no request.
    shape_of().unwrap();
    assert!(hub.take_requests().is_empty());
    // A repository without it: the error says what was missing.
    let missing =
        shardserve_operator::parse_manifests(&manifest.replace("org/llama-8b", "org/none"))
            .unwrap()
            .remove(0);
    let err = crate::plan::shape_of(
        &missing,
        Path::new("."),
        Some(cache.path().into()),
        &settings,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
}
