//! The conformance suite: one set of checks run against every backend
//! available here (in-process always, TCP over loopback, NCCL with a GPU).

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use half::{bf16, f16};

use super::element::Element;
use super::*;

type Group = Vec<Arc<dyn Collective>>;

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A TCP group on loopback, each rank joined from its own thread.
fn tcp_group(world: usize, timeout: Duration) -> Group {
    let coordinator = format!("127.0.0.1:{}", free_port());
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|r| {
                let mut cfg = CommConfig::tcp(RankId(r), world, coordinator.clone());
                cfg.timeout = timeout;
                cfg.connect_timeout = Duration::from_secs(20);
                s.spawn(move || connect(&cfg).unwrap())
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn backends(world: usize) -> Vec<(&'static str, Group)> {
    vec![
        ("local", LocalGroup::new(world)),
        ("tcp", tcp_group(world, Duration::from_secs(10))),
    ]
}

/// Runs `f` on every rank of `group` at once; results in rank order.
fn on_ranks<R: Send>(group: &Group, f: impl Fn(&dyn Collective) -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let joins: Vec<_> = group.iter().map(|c| s.spawn(|| f(c.as_ref()))).collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

/// Deterministic pseudo-random inputs in [-1, 1) for rank `r`.
fn input(r: usize, len: usize) -> Vec<f32> {
    let mut x = 0x9E37_79B9_u32.wrapping_mul(r as u32 + 1) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

trait Testable: Element + PartialEq + std::fmt::Debug
where
    for<'a> &'a mut [Self]: Into<HostSliceMut<'a>>,
{
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn bits(self) -> u64;
    const TOLERANCE: f32;
}
impl Testable for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
    const TOLERANCE: f32 = 1e-5;
}
impl Testable for f64 {
    fn from_f32(x: f32) -> Self {
        x.into()
    }
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn bits(self) -> u64 {
        self.to_bits()
    }
    const TOLERANCE: f32 = 1e-5;
}
impl Testable for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
    const TOLERANCE: f32 = 1e-2;
}
impl Testable for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn bits(self) -> u64 {
        self.to_bits().into()
    }
    const TOLERANCE: f32 = 6e-2;
}

/// All-reduce of `len` elements: the sequential sum within tolerance, and
/// bit-identical on every rank.
fn check_all_reduce<T: Testable>(name: &str, group: &Group, len: usize)
where
    for<'a> &'a mut [T]: Into<HostSliceMut<'a>>,
{
    let world = group.len();
    let inputs: Vec<Vec<T>> = (0..world)
        .map(|r| input(r, len).into_iter().map(T::from_f32).collect())
        .collect();
    let outs = on_ranks(group, |c| {
        let mut data = inputs[c.rank().0].clone();
        c.all_reduce((&mut data[..]).into()).unwrap();
        data
    });
    let first: Vec<u64> = outs[0].iter().map(|x| x.bits()).collect();
    for (r, out) in outs.iter().enumerate() {
        let bits: Vec<u64> = out.iter().map(|x| x.bits()).collect();
        assert!(
            bits == first,
            "{name}: rank {r} differs from rank 0 (len {len}, world {world})"
        );
    }
    for i in 0..len {
        let want: f32 = inputs.iter().map(|v| v[i].to_f32()).sum();
        let got = outs[0][i].to_f32();
        assert!(
            (got - want).abs() <= T::TOLERANCE * world as f32,
            "{name}: element {i} of {len} (world {world}): {got} vs {want}"
        );
    }
}

fn check_all_gather(name: &str, group: &Group) {
    // Odd, rank-dependent lengths; f32, f64, f16 and bf16.
    let outs = on_ranks(group, |c| {
        let r = c.rank().0;
        let mine: Vec<f32> = (0..2 * r + 3).map(|i| (r * 100 + i) as f32).collect();
        let halves: Vec<f16> = mine.iter().map(|&x| f16::from_f32(x)).collect();
        let bhalves: Vec<bf16> = mine.iter().map(|&x| bf16::from_f32(x)).collect();
        let wide: Vec<f64> = mine.iter().map(|&x| f64::from(x) + 0.125e-9).collect();
        (
            c.all_gather(&mine).unwrap(),
            c.all_gather_host(HostSlice::F64(&wide)).unwrap(),
            c.all_gather_host(HostSlice::F16(&halves)).unwrap(),
            c.all_gather_host(HostSlice::BF16(&bhalves)).unwrap(),
        )
    });
    let want: Vec<f32> = (0..group.len())
        .flat_map(|r| (0..2 * r + 3).map(move |i| (r * 100 + i) as f32))
        .collect();
    for (f, w, h, b) in outs {
        assert_eq!(f, want, "{name}: all_gather order");
        assert_eq!(
            w,
            HostVec::F64(want.iter().map(|&x| f64::from(x) + 0.125e-9).collect())
        );
        assert_eq!(
            h,
            HostVec::F16(want.iter().map(|&x| f16::from_f32(x)).collect())
        );
        assert_eq!(
            b,
            HostVec::BF16(want.iter().map(|&x| bf16::from_f32(x)).collect())
        );
    }
}

fn check_broadcast_and_barrier(name: &str, group: &Group) {
    let plan: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let entered = AtomicUsize::new(0);
    let outs = on_ranks(group, |c| {
        let r = c.rank().0;
        let mine = if r == 0 {
            plan.clone()
        } else {
            vec![r as u8; 5]
        };
        let got = c.broadcast_bytes(mine).unwrap();
        let empty = c.broadcast_bytes(Vec::new()).unwrap();
        std::thread::sleep(Duration::from_millis(10 * r as u64));
        entered.fetch_add(1, Ordering::SeqCst);
        c.barrier().unwrap();
        (got, empty, entered.load(Ordering::SeqCst))
    });
    for (got, empty, seen) in outs {
        assert!(got == plan, "{name}: broadcast differs from rank 0's bytes");
        assert!(empty.is_empty());
        assert_eq!(
            seen,
            group.len(),
            "{name}: barrier returned before every rank entered"
        );
    }
}

/// An element is summed the same way whether its buffer holds one token's
/// activations or a batch's: batching must not change a token's numbers.
fn check_sums_do_not_depend_on_length(name: &str, group: &Group) {
    let world = group.len();
    // Values of very different sizes, so that the order of addition shows.
    let row = |r: usize| -> Vec<f32> {
        input(r, 576)
            .into_iter()
            .enumerate()
            .map(|(i, x)| x * 10f32.powi(((i + r) % 7) as i32 - 3))
            .collect()
    };
    let alone = on_ranks(group, |c| {
        let mut data = row(c.rank().0);
        c.all_reduce(HostSliceMut::F32(&mut data)).unwrap();
        data
    });
    for rows_before in [1, 15, 63] {
        let batched = on_ranks(group, |c| {
            let r = c.rank().0;
            let mut data = input(r + world, rows_before * 576);
            data.extend(row(r));
            c.all_reduce(HostSliceMut::F32(&mut data)).unwrap();
            data.split_off(rows_before * 576)
        });
        for (r, (a, b)) in alone.iter().zip(&batched).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(
                same,
                "{name}: rank {r}: a row's sums changed with {rows_before} rows before it"
            );
        }
    }
}

/// The whole suite against one group.
fn conformance(name: &str, group: &Group) {
    for len in [1, 7, 576, 4097, 1 << 20] {
        check_all_reduce::<f32>(name, group, len);
        check_all_reduce::<f64>(name, group, len);
    }
    check_sums_do_not_depend_on_length(name, group);
    // Half types, small and large buffers.
    for len in [1, 7, 576, 4097, 100_003] {
        check_all_reduce::<f16>(name, group, len);
        check_all_reduce::<bf16>(name, group, len);
    }
    check_all_reduce::<f32>(name, group, 0);
    check_all_gather(name, group);
    check_broadcast_and_barrier(name, group);
}

#[test]
fn every_backend_passes_conformance_for_world_sizes_1_to_4() {
    for world in 1..=4 {
        for (name, group) in backends(world) {
            assert_eq!(group.len(), world);
            for (r, c) in group.iter().enumerate() {
                assert_eq!((c.rank(), c.world_size()), (RankId(r), world));
            }
            conformance(&format!("{name} world {world}"), &group);
        }
    }
}

#[test]
fn single_rank_passes_conformance() {
    conformance("single", &vec![Arc::new(SingleRank) as Arc<dyn Collective>]);
}

#[test]
fn tcp_all_reduce_of_ten_million_floats_is_exact_and_identical() {
    let group = tcp_group(3, Duration::from_secs(20));
    check_all_reduce::<f32>("tcp 10M", &group, 10_000_019);
}

#[test]
fn tcp_peer_that_drops_its_connection_fails_the_others_quickly() {
    let mut group = tcp_group(3, Duration::from_secs(3));
    drop(group.pop()); // rank 2 dies
    let start = Instant::now();
    let errors = on_ranks(&group, |c| {
        let mut data = vec![1.0f32; 576];
        c.all_reduce_sum(&mut data).unwrap_err()
    });
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    for e in &errors {
        assert!(
            matches!(e, CommError::PeerClosed { .. } | CommError::Timeout { .. }),
            "unexpected error {e}"
        );
    }
    // Rank 1 reads from rank 0 and sends to rank 2; rank 0 reads from rank 2.
    assert!(
        matches!(
            errors[0],
            CommError::PeerClosed {
                rank: RankId(2),
                ..
            }
        ),
        "{}",
        errors[0]
    );
    // The group is unusable afterwards, and says why.
    assert!(matches!(group[0].barrier(), Err(CommError::Broken(_))));
}

#[test]
fn tcp_stalled_peer_times_out_instead_of_hanging() {
    let group = tcp_group(2, Duration::from_millis(300));
    let start = Instant::now();
    let err = group[0].all_reduce_sum(&mut [1.0; 7]).unwrap_err(); // rank 1 never calls
    assert!(
        matches!(
            err,
            CommError::Timeout {
                rank: RankId(1),
                op: "all_reduce",
                ..
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn tcp_ranks_out_of_step_get_a_protocol_error() {
    let group = tcp_group(2, Duration::from_millis(500));
    let errs = on_ranks(&group, |c| {
        if c.rank().0 == 0 {
            c.barrier().unwrap_err()
        } else {
            c.broadcast_bytes(vec![1]).unwrap_err()
        }
    });
    assert!(
        matches!(
            errs[1],
            CommError::Protocol {
                rank: RankId(0),
                ..
            }
        ),
        "{}",
        errs[1]
    );
}

#[test]
fn tcp_rendezvous_refuses_a_rank_with_another_world_size() {
    let coordinator = format!("127.0.0.1:{}", free_port());
    let (lead, stray) = std::thread::scope(|s| {
        let mut a = CommConfig::tcp(RankId(0), 2, coordinator.clone());
        a.connect_timeout = Duration::from_secs(5);
        let mut b = CommConfig::tcp(RankId(1), 3, coordinator.clone());
        b.connect_timeout = Duration::from_secs(5);
        b.timeout = Duration::from_millis(500);
        let lead = s.spawn(move || connect(&a).map(|_| ()));
        let stray = s.spawn(move || connect(&b).map(|_| ()));
        (lead.join().unwrap(), stray.join().unwrap())
    });
    let msg = lead.unwrap_err().to_string();
    assert!(msg.contains("thinks the group has 3 ranks, not 2"), "{msg}");
    assert!(stray.is_err());
}

#[test]
fn connect_refuses_a_rank_outside_the_group() {
    let err = connect(&CommConfig::tcp(RankId(3), 3, "127.0.0.1:1")).unwrap_err();
    assert!(matches!(err, CommError::Config(_)), "{err}");
}

#[test]
fn local_rank_that_never_arrives_times_out() {
    let group = LocalGroup::with_timeout(2, Duration::from_millis(100));
    let err = group[0].barrier().unwrap_err();
    assert!(
        matches!(
            err,
            CommError::Timeout {
                rank: RankId(1),
                ..
            }
        ),
        "{err}"
    );
}

/// NCCL: refused with a clear reason without a driver; with GPUs, the suite.
#[test]
fn nccl_is_probed_before_use() {
    match nccl_available() {
        Err(CommError::Unavailable(why)) => {
            eprintln!("skipping the NCCL conformance run: {why}");
            let mut cfg = CommConfig::tcp(RankId(0), 2, "127.0.0.1:1");
            cfg.backend = CommBackend::Nccl { device: 0 };
            let err = connect(&cfg).unwrap_err();
            assert!(matches!(err, CommError::Unavailable(_)), "{err}");
            if cfg!(feature = "nccl") && !std::path::Path::new("/dev/nvidiactl").exists() {
                assert!(
                    err.to_string().contains("libcuda") || err.to_string().contains("device"),
                    "{err}"
                );
            }
        }
        Err(other) => panic!("probe failed oddly: {other}"),
        Ok(()) => nccl_conformance(),
    }
}

fn nccl_conformance() {
    #[cfg(feature = "nccl")]
    let devices = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    #[cfg(not(feature = "nccl"))]
    let devices = 0;
    for world in 1..=devices.min(4) {
        let group = nccl_group(world);
        conformance(&format!("nccl world {world}"), &group);
    }
}

fn nccl_group(world: usize) -> Group {
    let coordinator = format!("127.0.0.1:{}", free_port());
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|r| {
                let mut cfg = CommConfig::tcp(RankId(r), world, coordinator.clone());
                cfg.backend = CommBackend::Nccl { device: r };
                s.spawn(move || connect(&cfg).unwrap())
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

#[test]
fn a_deferred_member_loads_first_and_joins_later() {
    use super::{CommConfig, Deferred};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let coordinator = format!("127.0.0.1:{port}");
    let members: Vec<Arc<Deferred>> = (0..2)
        .map(|r| Arc::new(Deferred::new(RankId(r), 2)))
        .collect();
    // Before joining, a collective is refused (never a hang).
    assert!(matches!(members[0].barrier(), Err(CommError::Config(_))));
    let handles: Vec<_> = members
        .iter()
        .cloned()
        .enumerate()
        .map(|(r, m)| {
            let coordinator = coordinator.clone();
            std::thread::spawn(move || {
                // The second rank "loads" for a while: the first waits at the rendezvous, not in a collective.
                std::thread::sleep(std::time::Duration::from_millis(300 * r as u64));
                m.connect(&CommConfig::tcp(RankId(r), 2, coordinator))
                    .unwrap();
                let mut data = vec![r as f32 + 1.0; 5];
                m.all_reduce_sum(&mut data).unwrap();
                data
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![3.0; 5]);
    }
    let wrong = Deferred::new(RankId(0), 2);
    assert!(
        wrong
            .connect(&CommConfig::tcp(RankId(1), 2, "127.0.0.1:1"))
            .is_err()
    );
}
