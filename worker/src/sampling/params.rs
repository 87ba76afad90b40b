//! The per-request sampling knobs and their validation.

use serde::{Deserialize, Serialize};

/// How one sequence picks its tokens. The defaults switch every filter and
/// penalty off and decode greedily.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 decodes greedily (argmax of the penalised logits).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 switches the filter off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 is off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 is off.
    pub min_p: f32,
    /// HF/CTRL penalty on tokens seen in the prompt or the output; 1 is off.
    pub repetition_penalty: f32,
    /// OpenAI penalty subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI penalty subtracted per occurrence of a token already generated.
    pub frequency_penalty: f32,
    /// Seed for the sequence's RNG; `None` draws one at random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

/// Why a set of sampling parameters was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// A parameter lies outside the range it is defined on.
    #[error("{field}={value} is out of range {range}")]
    OutOfRange {
        field: &'static str,
        value: f32,
        range: &'static str,
    },
}

impl SamplingParams {
    /// Checks every field's range; the error names the first field that is out.
    pub fn validate(&self) -> Result<(), SamplingError> {
        // NaN fails every comparison, so each check is written as "inside".
        let checks = [
            (
                "temperature",
                self.temperature,
                (0.0..=100.0).contains(&self.temperature),
                "[0, 100]",
            ),
            (
                "top_p",
                self.top_p,
                self.top_p > 0.0 && self.top_p <= 1.0,
                "(0, 1]",
            ),
            (
                "min_p",
                self.min_p,
                (0.0..=1.0).contains(&self.min_p),
                "[0, 1]",
            ),
            (
                "repetition_penalty",
                self.repetition_penalty,
                self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
                "(0, inf)",
            ),
            (
                "presence_penalty",
                self.presence_penalty,
                (-2.0..=2.0).contains(&self.presence_penalty),
                "[-2, 2]",
            ),
            (
                "frequency_penalty",
                self.frequency_penalty,
                (-2.0..=2.0).contains(&self.frequency_penalty),
                "[-2, 2]",
            ),
        ];
        match checks.into_iter().find(|(_, _, ok, _)| !ok) {
            Some((field, value, _, range)) => Err(SamplingError::OutOfRange {
                field,
                value,
                range,
            }),
            None => Ok(()),
        }
    }

    /// Whether sampling reduces to argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Whether any penalty changes the logits before sampling.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(params: SamplingParams) -> String {
        params.validate().unwrap_err().to_string()
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let params = SamplingParams::default();
        assert!(params.is_greedy());
        assert_eq!(params.validate(), Ok(()));
    }

    #[test]
    fn validate_messages_name_the_field() {
        let base = SamplingParams::default;
        assert_eq!(
            message(SamplingParams {
                top_p: 1.5,
                ..base()
            }),
            "top_p=1.5 is out of range (0, 1]"
        );
        assert_eq!(
            message(SamplingParams {
                top_p: 0.0,
                ..base()
            }),
            "top_p=0 is out of range (0, 1]"
        );
        assert_eq!(
            message(SamplingParams {
                temperature: f32::NAN,
                ..base()
            }),
            "temperature=NaN is out of range [0, 100]"
        );
        assert_eq!(
            message(SamplingParams {
                temperature: -0.5,
                ..base()
            }),
            "temperature=-0.5 is out of range [0, 100]"
        );
        assert_eq!(
            message(SamplingParams {
                min_p: 2.0,
                ..base()
            }),
            "min_p=2 is out of range [0, 1]"
        );
        assert_eq!(
            message(SamplingParams {
                repetition_penalty: 0.0,
                ..base()
            }),
            "repetition_penalty=0 is out of range (0, inf)"
        );
        assert_eq!(
            message(SamplingParams {
                presence_penalty: 2.5,
                ..base()
            }),
            "presence_penalty=2.5 is out of range [-2, 2]"
        );
        assert_eq!(
            message(SamplingParams {
                frequency_penalty: -3.0,
                ..base()
            }),
            "frequency_penalty=-3 is out of range [-2, 2]"
        );
    }

    #[test]
    fn validate_accepts_the_range_edges() {
        let params = SamplingParams {
            temperature: 100.0,
            top_k: 1,
            top_p: 1.0,
            min_p: 1.0,
            repetition_penalty: 0.01,
            presence_penalty: -2.0,
            frequency_penalty: 2.0,
            seed: Some(7),
        };
        assert_eq!(params.validate(), Ok(()));
    }

    #[test]
    fn missing_json_fields_take_the_defaults() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"temperature":0.7,"seed":3}"#).unwrap();
        assert_eq!(
            params,
            SamplingParams {
                temperature: 0.7,
                seed: Some(3),
                ..SamplingParams::default()
            }
        );
    }
}
