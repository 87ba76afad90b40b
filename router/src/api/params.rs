//! Checks shared by every front end: sampling ranges, token limits and stop
//! strings, with messages that name the parameter and its value.

use serde_json::Value;
use shardserve_proto::v1 as pb;

use super::ApiError;

/// Limits of the served model that requests are checked against.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Context length, once a backend has reported it.
    pub context: Option<u32>,
    /// The router's own cap on tokens to generate (`--max-tokens`).
    pub max_tokens: Option<u32>,
}

/// Largest token limit accepted while the model's context is not known yet.
const MAX_TOKENS_CEILING: i64 = 1 << 20;

/// Sampling parameters as an API gives them, before checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Sampling {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
}

fn in_range(
    value: Option<f64>,
    param: &'static str,
    ok: impl Fn(f64) -> bool,
    range: &str,
) -> Result<f32, ApiError> {
    match value {
        None => Ok(0.0),
        Some(v) if v.is_finite() && ok(v) => Ok(v as f32),
        Some(v) => Err(ApiError::bad_request(
            format!("{param}={v} is out of range: it must be {range}"),
            Some(param),
        )),
    }
}

impl Sampling {
    /// The proto parameters; proto zeros mean "off" (top_p 0 → 1, ...).
    pub(crate) fn to_proto(&self) -> Result<pb::SamplingParams, ApiError> {
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) if (0..=i64::from(u32::MAX)).contains(&k) => k as u32,
            Some(k) => {
                return Err(ApiError::bad_request(
                    format!("top_k={k} is out of range: it must be -1 (off) or at least 0"),
                    Some("top_k"),
                ));
            }
        };
        Ok(pb::SamplingParams {
            temperature: in_range(
                self.temperature,
                "temperature",
                |v| (0.0..=2.0).contains(&v),
                "between 0 and 2",
            )?,
            top_p: in_range(self.top_p, "top_p", |v| v > 0.0 && v <= 1.0, "in (0, 1]")?,
            top_k,
            min_p: in_range(
                self.min_p,
                "min_p",
                |v| (0.0..=1.0).contains(&v),
                "between 0 and 1",
            )?,
            repetition_penalty: in_range(
                self.repetition_penalty,
                "repetition_penalty",
                |v| v > 0.0,
                "greater than 0",
            )?,
            // Any 64-bit value is a seed; negative ones keep their bits.
            seed: self.seed.map(|s| s as u64),
            presence_penalty: in_range(
                self.presence_penalty,
                "presence_penalty",
                |v| (-2.0..=2.0).contains(&v),
                "between -2 and 2",
            )?,
            frequency_penalty: in_range(
                self.frequency_penalty,
                "frequency_penalty",
                |v| (-2.0..=2.0).contains(&v),
                "between -2 and 2",
            )?,
        })
    }
}

/// A token limit: absent → `default`; negative, or more than the model's
/// context (or 2^20 while it is not known) → 400.
pub(crate) fn check_max_tokens(
    value: Option<i64>,
    param: &'static str,
    limits: Limits,
    default: u32,
) -> Result<u32, ApiError> {
    let Some(v) = value else {
        // Asking nothing (0: up to the context) is asking the cap, where there is one.
        return Ok(match (default, limits.max_tokens) {
            (0, Some(cap)) => cap,
            (d, Some(cap)) => d.min(cap),
            (d, None) => d,
        });
    };
    if let Some(cap) = limits.max_tokens
        && v > i64::from(cap)
    {
        return Err(ApiError::bad_request(
            format!("{param}={v} is more than this server's limit of {cap} tokens"),
            Some(param),
        ));
    }
    if v < 0 {
        return Err(ApiError::bad_request(
            format!("{param}={v} is invalid: it must be at least 0"),
            Some(param),
        ));
    }
    match limits.context {
        Some(context) if v > i64::from(context) => Err(ApiError::bad_request(
            format!("{param}={v} is more than the model's context of {context} tokens"),
            Some(param),
        )),
        None if v > MAX_TOKENS_CEILING => Err(ApiError::bad_request(
            format!("{param}={v} is more than {MAX_TOKENS_CEILING} tokens"),
            Some(param),
        )),
        _ => Ok(v as u32),
    }
}

/// `stop` given as a string or an array of strings (null: none).
pub(crate) fn stop_list(
    value: Option<&Value>,
    param: &'static str,
) -> Result<Vec<String>, ApiError> {
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::bad_request(
                    format!("{param}[{i}] must be a string, not {other}"),
                    Some(param),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::bad_request(
                format!("{param} must be a string or an array of strings, not {other}"),
                Some(param),
            ));
        }
    };
    if let Some(i) = list.iter().position(String::is_empty) {
        return Err(ApiError::bad_request(
            format!("{param}[{i}] is an empty string"),
            Some(param),
        ));
    }
    Ok(list)
}

/// Why [`refuse_unhonoured`] refuses, as every front end says it.
pub(crate) mod unhonoured {
    pub(crate) const STRUCTURED_OUTPUT: &str =
        "this server generates free text (no JSON mode, JSON schemas or grammars)";
    pub(crate) const TOOL_CALLS: &str = "this server does not call tools";
    pub(crate) const SUFFIX: &str =
        "this server does not insert text between a prompt and a suffix";
    pub(crate) const IMAGES: &str = "the served models read text only";
    pub(crate) const LOGIT_BIAS: &str = "this server applies no token biases";
}

/// Refuses a field whose meaning this server cannot honour (structured output, tool
/// calls, token biases): answered as if it were absent, the client would get free text
/// where it parses JSON or a tool call. Absent, `null`, `false`, `""`, `[]` and `{}`
/// ask for nothing and pass.
pub(crate) fn refuse_unhonoured(
    value: Option<&Value>,
    param: &'static str,
    why: &str,
) -> Result<(), ApiError> {
    let set = match value {
        None | Some(Value::Null | Value::Bool(false)) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    };
    if set {
        Err(ApiError::bad_request(
            format!("{param} is not supported: {why}"),
            Some(param),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(e: ApiError) -> String {
        e.message
    }

    #[test]
    fn unset_sampling_is_greedy_defaults() {
        assert_eq!(
            Sampling::default().to_proto().unwrap(),
            pb::SamplingParams::default()
        );
    }

    #[test]
    fn sampling_out_of_range_names_the_parameter() {
        let bad = |s: Sampling| message(s.to_proto().unwrap_err());
        let m = bad(Sampling {
            temperature: Some(-1.0),
            ..Default::default()
        });
        assert!(m.contains("temperature=-1"), "{m}");
        let m = bad(Sampling {
            top_p: Some(1.5),
            ..Default::default()
        });
        assert!(m.contains("top_p=1.5"), "{m}");
        let m = bad(Sampling {
            presence_penalty: Some(3.0),
            ..Default::default()
        });
        assert!(m.contains("presence_penalty=3"), "{m}");
        let m = bad(Sampling {
            top_k: Some(-5),
            ..Default::default()
        });
        assert!(m.contains("top_k=-5"), "{m}");
    }

    #[test]
    fn sampling_values_carry_over() {
        let p = Sampling {
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(-1),
            seed: Some(-1),
            frequency_penalty: Some(0.5),
            ..Default::default()
        }
        .to_proto()
        .unwrap();
        assert_eq!((p.temperature, p.top_p, p.top_k), (0.5, 0.9, 0));
        assert_eq!(p.seed, Some(u64::MAX));
        assert_eq!(p.frequency_penalty, 0.5);
    }

    #[test]
    fn max_tokens_checks() {
        let ctx = Limits {
            context: Some(8192),
            max_tokens: None,
        };
        assert_eq!(check_max_tokens(None, "max_tokens", ctx, 16).unwrap(), 16);
        assert_eq!(check_max_tokens(Some(0), "max_tokens", ctx, 16).unwrap(), 0);
        let m = message(check_max_tokens(Some(-1), "max_tokens", ctx, 16).unwrap_err());
        assert!(m.contains("max_tokens=-1"), "{m}");
        let m = message(check_max_tokens(Some(1_000_000), "max_tokens", ctx, 16).unwrap_err());
        assert!(m.contains("context of 8192"), "{m}");
        let unknown = Limits::default();
        assert!(check_max_tokens(Some(1_000_000), "max_tokens", unknown, 0).is_ok());
        assert!(check_max_tokens(Some(1 << 40), "max_tokens", unknown, 0).is_err());
        // The server's own cap: more is refused, nothing asked is the cap.
        let capped = Limits {
            context: Some(8192),
            max_tokens: Some(256),
        };
        let m = message(check_max_tokens(Some(257), "max_tokens", capped, 0).unwrap_err());
        assert_eq!(
            m,
            "max_tokens=257 is more than this server's limit of 256 tokens"
        );
        assert_eq!(
            check_max_tokens(Some(256), "max_tokens", capped, 0).unwrap(),
            256
        );
        assert_eq!(
            check_max_tokens(None, "max_tokens", capped, 0).unwrap(),
            256
        );
        assert_eq!(
            check_max_tokens(None, "max_new_tokens", capped, 100).unwrap(),
            100
        );
    }

    #[test]
    fn stop_as_string_or_array() {
        assert_eq!(stop_list(None, "stop").unwrap(), Vec::<String>::new());
        assert_eq!(stop_list(Some(&json!("\n")), "stop").unwrap(), ["\n"]);
        assert_eq!(
            stop_list(Some(&json!(["a", "b"])), "stop").unwrap(),
            ["a", "b"]
        );
        assert!(message(stop_list(Some(&json!([1])), "stop").unwrap_err()).contains("stop[0]"));
        assert!(message(stop_list(Some(&json!("")), "stop").unwrap_err()).contains("empty"));
        assert!(stop_list(Some(&json!(5)), "stop").is_err());
    }
}
