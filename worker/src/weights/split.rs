use std::ops::Range;

/// Which part of a 2-D tensor `[rows, cols]` a rank loads. Rows are output
/// features of a linear layer (column-parallel splits them), columns are its
/// input features (row-parallel splits them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    Full,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

impl Split {
    /// The `rank`-th of `world` equal parts of `len` rows, or `None` when
    /// they are not equal.
    pub fn even(len: usize, rank: usize, world: usize) -> Option<Range<usize>> {
        if world == 0 || rank >= world || !len.is_multiple_of(world) {
            return None;
        }
        let part = len / world;
        Some(rank * part..(rank + 1) * part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_split_covers_the_range_in_order() {
        let parts: Vec<_> = (0..3).map(|r| Split::even(9, r, 3).unwrap()).collect();
        assert_eq!(parts, vec![0..3, 3..6, 6..9]);
    }

    #[test]
    fn uneven_split_is_refused() {
        assert_eq!(Split::even(9, 0, 2), None);
        assert_eq!(Split::even(8, 2, 2), None);
    }
}
