//! What the builtin autoscaler keeps on each ModelDeployment, in one annotation: its
//! [`Memory`] between decisions (the operator keeps no state of its own, and a new
//! leader must carry on where the last one stopped) and its last change, which the
//! controller shows in the `Autoscaling` condition.

use k8s_openapi::jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::Memory;
use crate::crd::ModelDeployment;

/// The annotation holding the [`Record`] as JSON.
pub const AUTOSCALER_ANNOTATION: &str = "shardserve.io/autoscaler";

/// The autoscaler's annotation, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    #[serde(default)]
    pub memory: Memory,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<Change>,
}

/// One change of `replicas` made by the autoscaler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub at: Timestamp,
    pub from: u32,
    pub to: u32,
    pub why: String,
}

impl Record {
    /// The record on `md`; an absent or unreadable annotation (edited by hand) is a
    /// fresh start, which at worst delays a change by one delay.
    pub fn of(md: &ModelDeployment) -> Self {
        md.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUTOSCALER_ANNOTATION))
            .and_then(|json| serde_json::from_str(json).ok())
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Change {
    /// The change as a sentence, for events and the condition message.
    pub fn describe(&self) -> String {
        let verb = if self.to > self.from { "up" } else { "down" };
        format!(
            "scaled {verb} from {} to {} group(s) at {}: {}",
            self.from,
            self.to,
            self.at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            self.why
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn the_record_round_trips_through_the_annotation_and_junk_is_a_fresh_start() {
        let record = Record {
            memory: Memory {
                fewer_since: Some("2026-12-06T10:00:00Z".parse().unwrap()),
                fewer_at_most: 2,
                ..Memory::default()
            },
            last_change: Some(Change {
                at: "2026-12-06T09:00:00Z".parse().unwrap(),
                from: 0,
                to: 1,
                why: "3 request(s) wait and no group runs".into(),
            }),
        };
        let mut md = crate::controller::fixtures::demo(1);
        md.metadata.annotations = Some(BTreeMap::from([(
            AUTOSCALER_ANNOTATION.to_string(),
            record.to_json(),
        )]));
        assert_eq!(Record::of(&md), record);
        assert_eq!(
            record.last_change.unwrap().describe(),
            "scaled up from 0 to 1 group(s) at 2026-12-06T09:00:00Z: 3 request(s) wait and no group runs"
        );
        md.metadata.annotations = Some(BTreeMap::from([(
            AUTOSCALER_ANNOTATION.to_string(),
            "{not json".to_string(),
        )]));
        assert_eq!(Record::of(&md), Record::default());
    }
}
