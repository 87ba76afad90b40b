//! Memory sizes as people write them: `80GiB`, `80Gi`, `141GB`, `40G`, or
//! plain bytes. Decimal suffixes are powers of 1000, binary ones of 1024.

/// A size that is not a number followed by a known suffix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a memory size; write a number with an optional suffix: Ki, Mi, Gi, Ti (or KiB…), K, M, G, T (or KB…)"
)]
pub struct BytesError(pub String);

/// Parses a memory size into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, BytesError> {
    let bad = || BytesError(text.to_string());
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let suffix = suffix.trim();
    let suffix = suffix.strip_suffix('B').unwrap_or(suffix);
    let scale: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes.round() as u64)
}

/// `bytes` in GiB with two decimals, for people.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_and_decimal_suffixes_parse() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("80Gi"), Ok(80 << 30));
        assert_eq!(parse_bytes("141GB"), Ok(141_000_000_000));
        assert_eq!(parse_bytes("40G"), Ok(40_000_000_000));
        assert_eq!(parse_bytes("512Mi"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("1024"), Ok(1024));
    }

    #[test]
    fn nonsense_is_refused_naming_it() {
        for text in ["", "GiB", "80 parsecs", "-1Gi", "80Xi"] {
            let e = parse_bytes(text).unwrap_err();
            assert!(e.to_string().starts_with(&format!("{text:?}")), "{e}");
        }
    }
}
