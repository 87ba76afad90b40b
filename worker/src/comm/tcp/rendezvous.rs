//! How the ranks of a group find each other. Every rank binds its ring
//! listener first; rank 0 listens on the coordinator address, the others
//! connect there and say (rank, world size, listen address); rank 0 answers
//! each with the table of every rank's listen address. Then each rank
//! connects to its successor and accepts its predecessor.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::wire::{Link, Op, Tag};
use crate::comm::{CommConfig, CommError, RankId};

/// The two ring connections of one rank.
pub(super) struct Ring {
    pub next: Link,
    pub prev: Link,
}

const TAG_HELLO: Tag = Tag {
    op: Op::Hello,
    dtype: 0,
    seq: 0,
};
const TAG_PEERS: Tag = Tag {
    op: Op::Peers,
    dtype: 0,
    seq: 0,
};
const TAG_RING: Tag = Tag {
    op: Op::RingHello,
    dtype: 0,
    seq: 0,
};

pub(super) fn meet(cfg: &CommConfig) -> Result<Ring, CommError> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let fail = |detail: String| CommError::Rendezvous {
        addr: cfg.coordinator.clone(),
        detail,
    };
    let n = cfg.world_size;
    let me = cfg.rank;
    let table = if me.0 == 0 {
        lead(cfg, deadline)?
    } else {
        follow(cfg, deadline)?
    };
    let (listener, peers) = table;
    let next = RankId((me.0 + 1) % n);
    let prev = RankId((me.0 + n - 1) % n);
    let stream = connect_until(peers[next.0], deadline).map_err(|e| {
        fail(format!(
            "cannot reach rank {next} at {}: {e}",
            peers[next.0]
        ))
    })?;
    let mut next_link = Link::new(stream, next, cfg.timeout).map_err(|e| fail(e.to_string()))?;
    next_link.send(TAG_RING, &(me.0 as u32).to_le_bytes())?;
    let stream = accept_until(&listener, deadline).map_err(|e| {
        fail(format!(
            "rank {prev} did not connect to {peers:?}[{me}]: {e}"
        ))
    })?;
    let mut prev_link = Link::new(stream, prev, cfg.timeout).map_err(|e| fail(e.to_string()))?;
    let said = read_u32(&prev_link.recv(TAG_RING)?, prev)?;
    if said as usize != prev.0 {
        return Err(fail(format!(
            "rank {said} connected where rank {prev} was expected"
        )));
    }
    Ok(Ring {
        next: next_link,
        prev: prev_link,
    })
}

type Table = (TcpListener, Vec<SocketAddr>);

fn lead(cfg: &CommConfig, deadline: Instant) -> Result<Table, CommError> {
    let fail = |detail: String| CommError::Rendezvous {
        addr: cfg.coordinator.clone(),
        detail,
    };
    let coord = resolve(&cfg.coordinator).map_err(&fail)?;
    // The coordinator name may resolve to an address this pod cannot bind
    // (a Service IP): then listen on every interface, same port.
    let coordinator = TcpListener::bind(coord)
        .or_else(|_| TcpListener::bind(SocketAddr::new(unspecified(coord.ip()), coord.port())))
        .map_err(|e| fail(format!("cannot listen: {e}")))?;
    let ring = TcpListener::bind(
        cfg.listen
            .unwrap_or(SocketAddr::new(unspecified(coord.ip()), 0)),
    )
    .map_err(|e| fail(format!("cannot listen for the ring: {e}")))?;
    let ring_port = ring.local_addr().map_err(|e| fail(e.to_string()))?.port();
    let n = cfg.world_size;
    let mut peers: Vec<Option<SocketAddr>> = vec![None; n];
    let mut conns: Vec<Link> = Vec::with_capacity(n - 1);
    let mut seen_by: Vec<IpAddr> = Vec::with_capacity(n - 1);
    while conns.len() < n - 1 {
        let stream = accept_until(&coordinator, deadline).map_err(|e| {
            let missing: Vec<usize> = (1..n).filter(|&r| peers[r].is_none()).collect();
            fail(format!("ranks {missing:?} never arrived: {e}"))
        })?;
        let local_ip = stream.local_addr().map_err(|e| fail(e.to_string()))?.ip();
        let mut link =
            Link::new(stream, RankId(usize::MAX), cfg.timeout).map_err(|e| fail(e.to_string()))?;
        let hello = link.recv(TAG_HELLO)?;
        let (rank, world, addr) =
            parse_hello(&hello).ok_or_else(|| fail("malformed hello".into()))?;
        if world != n {
            return Err(fail(format!(
                "rank {rank} thinks the group has {world} ranks, not {n}"
            )));
        }
        if rank == 0 || rank >= n || peers[rank].is_some() {
            return Err(fail(format!(
                "rank {rank} arrived twice or is outside 1..{n}"
            )));
        }
        link.peer = RankId(rank);
        peers[rank] = Some(addr);
        conns.push(link);
        seen_by.push(local_ip);
    }
    for (link, ip) in conns.iter_mut().zip(seen_by) {
        // Rank 0's own entry: the address this peer already reached it at.
        let mut table = peers.clone();
        table[0] = Some(SocketAddr::new(ip, ring_port));
        let text: Vec<String> = table
            .iter()
            .map(|a| a.map(|a| a.to_string()).unwrap_or_default())
            .collect();
        link.send(TAG_PEERS, text.join("\n").as_bytes())?;
    }
    let mut table: Vec<SocketAddr> = peers
        .into_iter()
        .map(|a| a.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))))
        .collect();
    table[0] = ring.local_addr().map_err(|e| fail(e.to_string()))?;
    Ok((ring, table))
}

fn follow(cfg: &CommConfig, deadline: Instant) -> Result<Table, CommError> {
    let fail = |detail: String| CommError::Rendezvous {
        addr: cfg.coordinator.clone(),
        detail,
    };
    let coord = resolve(&cfg.coordinator).map_err(&fail)?;
    let stream =
        connect_until(coord, deadline).map_err(|e| fail(format!("rank 0 unreachable: {e}")))?;
    let local_ip = stream.local_addr().map_err(|e| fail(e.to_string()))?.ip();
    let mut link = Link::new(stream, RankId(0), cfg.timeout).map_err(|e| fail(e.to_string()))?;
    let ring = TcpListener::bind(cfg.listen.unwrap_or(SocketAddr::new(local_ip, 0)))
        .map_err(|e| fail(format!("cannot listen for the ring: {e}")))?;
    let mut advertised = ring.local_addr().map_err(|e| fail(e.to_string()))?;
    if advertised.ip().is_unspecified() {
        advertised.set_ip(local_ip);
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&(cfg.rank.0 as u32).to_le_bytes());
    hello.extend_from_slice(&(cfg.world_size as u32).to_le_bytes());
    hello.extend_from_slice(advertised.to_string().as_bytes());
    link.send(TAG_HELLO, &hello)?;
    // Rank 0 answers once every rank has arrived: wait up to the rendezvous
    // deadline, not the per-operation timeout.
    let table = loop {
        match link.recv(TAG_PEERS) {
            Err(CommError::Timeout { .. }) if Instant::now() < deadline => continue,
            other => break other?,
        }
    };
    let text = String::from_utf8(table).map_err(|_| fail("peer table is not text".into()))?;
    let peers: Vec<SocketAddr> = text
        .split('\n')
        .map(|a| {
            a.parse()
                .map_err(|_| fail(format!("bad address {a:?} in the peer table")))
        })
        .collect::<Result<_, _>>()?;
    if peers.len() != cfg.world_size {
        return Err(fail(format!(
            "peer table has {} ranks, not {}",
            peers.len(),
            cfg.world_size
        )));
    }
    Ok((ring, peers))
}

fn parse_hello(b: &[u8]) -> Option<(usize, usize, SocketAddr)> {
    let rank = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
    let world = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?) as usize;
    let addr = std::str::from_utf8(b.get(8..)?).ok()?.parse().ok()?;
    Some((rank, world, addr))
}

fn read_u32(b: &[u8], from: RankId) -> Result<u32, CommError> {
    b.try_into()
        .map(u32::from_le_bytes)
        .map_err(|_| CommError::Protocol {
            rank: from,
            op: Op::RingHello.name(),
            detail: format!("{} bytes where a rank number was expected", b.len()),
        })
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "resolves to no address".to_string())
}

fn unspecified(like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    }
}

/// Connects, retrying while the listener is not up yet, until `deadline`.
fn connect_until(addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
            Ok(s) => return Ok(s),
            Err(e) if left.is_zero() => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20).min(left)),
        }
    }
}

/// Accepts one connection, or fails at `deadline`.
fn accept_until(listener: &TcpListener, deadline: Instant) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "nobody connected in time",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}
