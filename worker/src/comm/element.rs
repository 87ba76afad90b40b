//! The element types that collectives move (f32, f64, f16, bf16): their wire
//! encoding (little-endian) and the one summation rule every backend uses.

use half::{bf16, f16};

/// Element type of a collective's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    /// Unrounded partial sums (the row-parallel layers' quantised products).
    F64,
    F16,
    BF16,
}

impl DType {
    pub(crate) fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::F64 => 4,
        }
    }
}

/// Borrowed host data of one element type.
#[derive(Clone, Copy, Debug)]
pub enum HostSlice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Mutably borrowed host data of one element type (all-reduce in place).
#[derive(Debug)]
pub enum HostSliceMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

/// Owned host data of one element type (what all-gather returns).
#[derive(Clone, Debug, PartialEq)]
pub enum HostVec {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostSlice<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            HostSlice::F32(_) => DType::F32,
            HostSlice::F64(_) => DType::F64,
            HostSlice::F16(_) => DType::F16,
            HostSlice::BF16(_) => DType::BF16,
        }
    }
    pub fn to_vec(&self) -> HostVec {
        match self {
            HostSlice::F32(s) => HostVec::F32(s.to_vec()),
            HostSlice::F64(s) => HostVec::F64(s.to_vec()),
            HostSlice::F16(s) => HostVec::F16(s.to_vec()),
            HostSlice::BF16(s) => HostVec::BF16(s.to_vec()),
        }
    }
}

impl HostVec {
    pub fn dtype(&self) -> DType {
        match self {
            HostVec::F32(_) => DType::F32,
            HostVec::F64(_) => DType::F64,
            HostVec::F16(_) => DType::F16,
            HostVec::BF16(_) => DType::BF16,
        }
    }
}

macro_rules! host_from {
    ($t:ty, $v:ident) => {
        impl<'a> From<&'a [$t]> for HostSlice<'a> {
            fn from(s: &'a [$t]) -> Self {
                HostSlice::$v(s)
            }
        }
        impl<'a> From<&'a mut [$t]> for HostSliceMut<'a> {
            fn from(s: &'a mut [$t]) -> Self {
                HostSliceMut::$v(s)
            }
        }
        impl From<Vec<$t>> for HostVec {
            fn from(v: Vec<$t>) -> Self {
                HostVec::$v(v)
            }
        }
    };
}
host_from!(f32, F32);
host_from!(f64, F64);
host_from!(f16, F16);
host_from!(bf16, BF16);

/// An element the backends can move and add. Sums of half types are
/// computed in f32 and rounded after each addition (as NCCL does).
pub(crate) trait Element: Copy + Default + Send + Sync + 'static {
    const DTYPE: DType;
    const SIZE: usize;
    fn add(self, other: Self) -> Self;
    fn put(self, out: &mut Vec<u8>);
    fn get(bytes: &[u8]) -> Self;
}

macro_rules! float_element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline]
            fn add(self, other: Self) -> Self {
                self + other
            }
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b[..Self::SIZE].try_into().expect("one element's bytes"))
            }
        }
    };
}
float_element!(f32, F32);
float_element!(f64, F64);

macro_rules! half_element {
    ($t:ty, $d:ident) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            const SIZE: usize = 2;
            #[inline]
            fn add(self, other: Self) -> Self {
                <$t>::from_f32(self.to_f32() + other.to_f32())
            }
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes([b[0], b[1]])
            }
        }
    };
}
half_element!(f16, F16);
half_element!(bf16, BF16);

/// `data` as little-endian bytes.
pub(crate) fn encode<T: Element>(data: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * T::SIZE);
    for &x in data {
        x.put(&mut out);
    }
    out
}

/// Overwrites `out` with the elements in `bytes` (same length).
pub(crate) fn decode_into<T: Element>(bytes: &[u8], out: &mut [T]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *o = T::get(b);
    }
}

/// Sum of every rank's block (encoded), in rank order, into `out`.
pub(crate) fn sum_in_rank_order<T: Element, B: AsRef<[u8]>>(blocks: &[B], out: &mut [T]) {
    if let Some((first, rest)) = blocks.split_first() {
        decode_into(first.as_ref(), out);
        for b in rest {
            for (a, x) in out.iter_mut().zip(b.as_ref().chunks_exact(T::SIZE)) {
                *a = a.add(T::get(x));
            }
        }
    }
}

/// Concatenation of every rank's block (encoded), in rank order.
pub(crate) fn concat<T: Element, B: AsRef<[u8]>>(blocks: &[B]) -> Vec<T> {
    let total: usize = blocks.iter().map(|b| b.as_ref().len() / T::SIZE).sum();
    let mut out = Vec::with_capacity(total);
    for b in blocks {
        out.extend(b.as_ref().chunks_exact(T::SIZE).map(T::get));
    }
    out
}
