use std::ops::Deref;

use memmap2::Mmap;

/// A model file's bytes as the readers parse them: memory-mapped from disk (how
/// models are served), or held in memory (bytes handed over whole, as the fuzz
/// targets do). The readers check and slice both the same way.
pub(super) enum FileBytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}
