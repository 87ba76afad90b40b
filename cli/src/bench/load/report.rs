//! The load test's report: one JSON document, or an aligned table.

use std::fmt::Write as _;

use serde::Serialize;

use super::stats::Level;

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub url: String,
    pub model: String,
    /// The prompt length asked for (the server's count is per level).
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub levels: Vec<Level>,
}

impl Report {
    /// Requests that failed, over all levels, and the first error's text.
    pub(super) fn failures(&self) -> (usize, usize, Option<&str>) {
        let failed = self.levels.iter().map(|l| l.errors).sum();
        let total = self.levels.iter().map(|l| l.requests).sum();
        let first = self
            .levels
            .iter()
            .find_map(|l| l.error_samples.first())
            .map(String::as_str);
        (failed, total, first)
    }

    /// The table printed without `--json`: one row per level, then the
    /// error samples of each level that had errors.
    pub(super) fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "url {}  model {}  prompt ~{} tokens  gen {} tokens",
            self.url, self.model, self.prompt_tokens, self.gen_tokens
        );
        let _ = writeln!(
            out,
            "{:>11} {:>8} {:>6} {:>9} {:>11} {:>11} {:>11} {:>11} {:>10}",
            "concurrency",
            "requests",
            "errors",
            "tok/s",
            "ttft p50 ms",
            "ttft p99 ms",
            "tpot p50 ms",
            "tpot p99 ms",
            "prompt tok"
        );
        for l in &self.levels {
            let _ = writeln!(
                out,
                "{:>11} {:>8} {:>6} {:>9.1} {:>11} {:>11} {:>11} {:>11} {:>10}",
                l.concurrency,
                l.requests,
                l.errors,
                l.tokens_per_second,
                cell(l.ttft_ms.p50),
                cell(l.ttft_ms.p99),
                cell(l.tpot_ms.p50),
                cell(l.tpot_ms.p99),
                cell(l.prompt_tokens_mean),
            );
        }
        for l in self.levels.iter().filter(|l| l.errors > 0) {
            let _ = writeln!(
                out,
                "concurrency {}: {} of {} requests failed:",
                l.concurrency, l.errors, l.requests
            );
            for e in &l.error_samples {
                let _ = writeln!(out, "  {e}");
            }
        }
        out
    }
}

fn cell(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

#[cfg(test)]
mod tests {
    use super::super::stats::Quantiles;
    use super::*;

    #[test]
    fn the_table_aligns_and_lists_errors() {
        let level = |concurrency, errors: usize| Level {
            concurrency,
            requests: 4,
            errors,
            generated_tokens: 32,
            wall_s: 0.5,
            tokens_per_second: 64.0,
            ttft_ms: Quantiles {
                p50: Some(41.0),
                p99: Some(60.0),
            },
            tpot_ms: Quantiles {
                p50: if errors == 4 { None } else { Some(20.0) },
                p99: None,
            },
            prompt_tokens_mean: Some(33.0),
            error_samples: (0..errors.min(1))
                .map(|_| "HTTP 503: busy".into())
                .collect(),
        };
        let report = Report {
            url: "http://127.0.0.1:8080".into(),
            model: "smollm2".into(),
            prompt_tokens: 32,
            gen_tokens: 8,
            levels: vec![level(1, 0), level(16, 4)],
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[1].len(), lines[2].len(), "{table}");
        assert_eq!(lines[2].len(), lines[3].len(), "{table}");
        assert!(
            lines[2].contains("41.0") && lines[2].contains("64.0"),
            "{table}"
        );
        assert!(lines[3].contains(" - "), "{table}");
        assert_eq!(lines[4], "concurrency 16: 4 of 4 requests failed:");
        assert_eq!(lines[5], "  HTTP 503: busy");
        assert_eq!(report.failures(), (4, 8, Some("HTTP 503: busy")));
    }
}
