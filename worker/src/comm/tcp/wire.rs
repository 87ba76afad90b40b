//! Frames on a TCP link: a fixed header (magic, op code, dtype, sequence
//! number, payload length) so that two ranks out of step, or a stranger on
//! the port, are detected instead of misread. Every read and write is bounded
//! by the link's timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::comm::{CommError, RankId};

const MAGIC: u32 = 0x5353_4331; // "SSC1": shardserve collectives, version 1
const HEADER: usize = 20;
/// Frames up to this size go out as one write (header and payload together).
const COALESCE: usize = 64 * 1024;
/// No payload is larger than this (a corrupt length must not allocate 4 GB).
const MAX_PAYLOAD: u64 = 1 << 34;

/// What a frame is part of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Hello = 1,
    Peers = 2,
    RingHello = 3,
    AllReduce = 10,
    AllGather = 11,
    Broadcast = 12,
    Barrier = 13,
}

impl Op {
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Hello => "rendezvous hello",
            Op::Peers => "rendezvous peer table",
            Op::RingHello => "ring connect",
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

/// The header fields both sides must agree on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Tag {
    pub op: Op,
    pub dtype: u8,
    pub seq: u32,
}

/// One persistent, timed connection to a known peer.
#[derive(Debug)]
pub(super) struct Link {
    stream: TcpStream,
    pub peer: RankId,
    timeout: Duration,
}

impl Link {
    pub(super) fn new(stream: TcpStream, peer: RankId, timeout: Duration) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            peer,
            timeout,
        })
    }

    pub(super) fn send(&mut self, tag: Tag, payload: &[u8]) -> Result<(), CommError> {
        let mut head = [0u8; HEADER];
        head[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        head[4] = tag.op as u8;
        head[5] = tag.dtype;
        head[8..12].copy_from_slice(&tag.seq.to_le_bytes());
        head[12..20].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let res = if payload.len() <= COALESCE {
            let mut buf = Vec::with_capacity(HEADER + payload.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(payload);
            self.stream.write_all(&buf)
        } else {
            self.stream
                .write_all(&head)
                .and_then(|()| self.stream.write_all(payload))
        };
        res.map_err(|e| self.io_error(tag.op, e))
    }

    /// The next frame's payload; its header must carry `tag`.
    pub(super) fn recv(&mut self, tag: Tag) -> Result<Vec<u8>, CommError> {
        let mut head = [0u8; HEADER];
        self.stream
            .read_exact(&mut head)
            .map_err(|e| self.io_error(tag.op, e))?;
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let seq = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        let mut len = [0u8; 8];
        len.copy_from_slice(&head[12..20]);
        let len = u64::from_le_bytes(len);
        let detail = if magic != MAGIC {
            Some(format!("bad magic {magic:#010x} (not a shardserve rank?)"))
        } else if head[4] != tag.op as u8 || head[5] != tag.dtype || seq != tag.seq {
            Some(format!(
                "got op {} dtype {} seq {}, expected op {} dtype {} seq {} (ranks out of step)",
                head[4], head[5], seq, tag.op as u8, tag.dtype, tag.seq
            ))
        } else if len > MAX_PAYLOAD {
            Some(format!("payload of {len} bytes"))
        } else {
            None
        };
        if let Some(detail) = detail {
            return Err(CommError::Protocol {
                rank: self.peer,
                op: tag.op.name(),
                detail,
            });
        }
        let mut payload = vec![0u8; len as usize];
        self.stream
            .read_exact(&mut payload)
            .map_err(|e| self.io_error(tag.op, e))?;
        Ok(payload)
    }

    fn io_error(&self, op: Op, e: std::io::Error) -> CommError {
        classify(e, self.peer, op.name(), self.timeout)
    }
}

/// Names a failed read or write: timeout, closed peer, or other i/o error.
pub(super) fn classify(
    e: std::io::Error,
    rank: RankId,
    op: &'static str,
    after: Duration,
) -> CommError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CommError::Timeout { rank, op, after },
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => CommError::PeerClosed { rank, op },
        _ => CommError::Io {
            rank,
            op,
            source: e,
        },
    }
}
