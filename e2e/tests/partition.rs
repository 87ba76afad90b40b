//! A partition between the ranks of a group: the three ranks of a tensor-3 group
//! (the demo model's 9 heads split three ways) run as separate hosts, each in its
//! own network namespace on a bridge (`ip netns`, veth). Mid-stream the link of rank 1 goes down (its packets are dropped, no reset
//! reaches anyone): the request fails with UNAVAILABLE within the collective timeout,
//! every rank exits (no hang), and the test, as a supervisor would, starts the group
//! again on the healed link, where it serves. Needs root (CAP_NET_ADMIN) and `ip`;
//! skipped with the reason where network namespaces cannot be made.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shardserve_e2e::{demo_model, shardserve_bin};
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::inference_client::InferenceClient;

const MODEL: &str = "smollm2";
const RANKS: usize = 3;
/// The collective's per-operation timeout given to the ranks (`--comm-timeout`).
const COMM_TIMEOUT: Duration = Duration::from_secs(3);
const GRPC_PORT: u16 = 50051;
const COORDINATOR_PORT: u16 = 29500;

/// A namespace per rank on a bridge; everything is removed on drop.
struct Net {
    id: u32,
    subnet: u8,
}

impl Net {
    fn ns(&self, rank: usize) -> String {
        format!("ssp{}r{rank}", self.id)
    }
    /// The root side of rank `rank`'s veth pair: down cuts the rank off.
    fn veth(&self, rank: usize) -> String {
        format!("ssv{}r{rank}", self.id)
    }
    fn bridge(&self) -> String {
        format!("ssbr{}", self.id)
    }
    fn address(&self, rank: usize) -> String {
        format!("10.231.{}.{}", self.subnet, rank + 1)
    }

    /// Builds the namespaces, or says why it cannot.
    fn make() -> Result<Self, String> {
        let id = std::process::id() % 100_000;
        let net = Net {
            id,
            subnet: (id % 250) as u8 + 1,
        };
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.231.{}.254/24", net.subnet),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        for rank in 0..RANKS {
            let (ns, veth) = (net.ns(rank), net.veth(rank));
            let inside = format!("{veth}i");
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &veth, "master", &bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            let address = format!("{}/24", net.address(rank));
            ip(&["-n", &ns, "addr", "add", &address, "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for rank in 0..RANKS {
            let _ = ip(&["link", "del", &self.veth(rank)]);
            let _ = ip(&["netns", "del", &self.ns(rank)]);
        }
        let _ = ip(&["link", "del", &self.bridge()]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("`ip` cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A rank process inside its namespace, its log in a file.
struct Rank {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rank {
    fn start(net: &Net, rank: usize) -> Self {
        let model = demo_model();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stderr");
        let child = Command::new("ip")
            .args(["netns", "exec", &net.ns(rank)])
            .arg(shardserve_bin())
            .args(["worker", "--model", model.to_str().unwrap()])
            .args(["--served-model-name", MODEL, "--threads", "1"])
            .args(["--tensor", &RANKS.to_string(), "--rank", &rank.to_string()])
            .args([
                "--coordinator",
                &format!("{}:{COORDINATOR_PORT}", net.address(0)),
            ])
            .args(["--comm-timeout", &COMM_TIMEOUT.as_secs().to_string()])
            .args(["--listen", &format!("{}:{GRPC_PORT}", net.address(rank))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("ip netns exec runs");
        Rank {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts every rank and waits until rank 0 serves.
fn start_group(net: &Net) -> Vec<Rank> {
    let mut ranks: Vec<Rank> = (0..RANKS).map(|rank| Rank::start(net, rank)).collect();
    let deadline = Instant::now() + shardserve_e2e::STARTUP;
    while !ranks[0].log().contains("model loaded") {
        let exited = ranks
            .iter_mut()
            .any(|r| matches!(r.child.try_wait(), Ok(Some(_))));
        if exited || Instant::now() > deadline {
            let logs: Vec<String> = ranks
                .iter()
                .enumerate()
                .map(|(i, r)| format!("rank {i}:\n{}", r.log()))
                .collect();
            panic!("the group did not load:\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ranks
}

fn request(max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: MODEL.into(),
        prompt: Some(pb::generate_request::Prompt::Text("Count:".into())),
        stopping: Some(pb::StoppingCriteria {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn client(net: &Net) -> InferenceClient<tonic::transport::Channel> {
    let url = format!("http://{}:{GRPC_PORT}", net.address(0));
    InferenceClient::connect(url).await.expect("rank 0 accepts")
}

#[test]
fn a_partitioned_rank_fails_its_group_fast_and_the_group_serves_again_once_healed() {
    demo_model();
    let net = match Net::make() {
        Ok(net) => net,
        Err(why) => {
            println!("skipped: cannot make network namespaces ({why}); needs root and `ip`");
            return;
        }
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut ranks = start_group(&net);

    // A long stream; once tokens flow, rank 1's link goes down.
    let (failed_after, status) = runtime.block_on(async {
        let mut client = client(&net).await;
        let mut stream = client.generate(request(4000)).await.unwrap().into_inner();
        let mut tokens = 0;
        while tokens < 8 {
            stream.message().await.unwrap().expect("a token");
            tokens += 1;
        }
        ip(&["link", "set", &net.veth(1), "down"]).unwrap();
        let cut = Instant::now();
        let status = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without an error after the partition"),
                Err(status) => break status,
            }
        };
        (cut.elapsed(), status)
    });
    println!("partition: the request failed {failed_after:?} after the cut: {status:?}");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        failed_after < COMM_TIMEOUT * 4,
        "the request failed only {failed_after:?} after the cut (collective timeout {COMM_TIMEOUT:?})"
    );
    // Every rank ends: the leader's engine stopped, the others hear no heartbeat.
    for (rank, process) in ranks.iter_mut().enumerate() {
        assert!(
            process.exited_within(COMM_TIMEOUT * 4 + Duration::from_secs(20)),
            "rank {rank} still runs after the partition:\n{}",
            process.log()
        );
    }
    drop(ranks);

    // Healed: the supervisor (this test) starts the group again, and it serves.
    ip(&["link", "set", &net.veth(1), "up"]).unwrap();
    let _ranks = start_group(&net);
    let text = runtime.block_on(async {
        let mut client = client(&net).await;
        let mut stream = client.generate(request(6)).await.unwrap().into_inner();
        let mut finished = None;
        while let Some(message) = stream.message().await.unwrap() {
            if let Some(pb::generate_response::Event::Finished(f)) = message.event {
                finished = Some(f.text);
            }
        }
        finished.expect("a Finished message")
    });
    assert!(!text.is_empty());
}
