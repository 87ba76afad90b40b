//! Bringing a running group's LoRA adapters to its deployment's
//! `spec.loraAdapters` through the group's Adapters API, so that changing the
//! list never restarts a group. The operator runs it for every serving group;
//! `shardserve up` for each group it starts. Adapters the list does not name
//! (loaded at run time through the router) are left alone, unless the list
//! names one differently: the list wins.

use std::collections::BTreeMap;

use shardserve_proto::v1 as pb;
use shardserve_proto::v1::adapters_client::AdaptersClient;
use shardserve_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// One adapter as a deployment wants it: (name, source as the worker takes it).
pub type Wanted = (String, String);

/// What to do to one adapter of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Served from the wanted source already.
    Keep(String),
    /// Not served, or served from another source: load (over it).
    Load { name: String, source: String },
    /// Dropped from the list since it was loaded from it: unload.
    Unload(String),
}

/// What became of one adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Kept,
    Loaded,
    Unloaded,
    /// The group refused it (a bad file, an unknown source), with its reason.
    Failed(String),
}

/// The actions that bring `served` ((name, source) pairs the group reports) to
/// `wanted`; `retired` are names a previous list had and this one does not.
pub fn plan(served: &[(String, String)], wanted: &[Wanted], retired: &[String]) -> Vec<Action> {
    let served: BTreeMap<&str, &str> = served
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let mut actions: Vec<Action> = wanted
        .iter()
        .map(|(name, source)| match served.get(name.as_str()) {
            Some(&current) if current == source => Action::Keep(name.clone()),
            _ => Action::Load {
                name: name.clone(),
                source: source.clone(),
            },
        })
        .collect();
    actions.extend(
        retired
            .iter()
            .filter(|r| served.contains_key(r.as_str()) && !wanted.iter().any(|(n, _)| n == *r))
            .map(|r| Action::Unload(r.clone())),
    );
    actions
}

/// Reads the group's adapters, then loads and unloads what [`plan`] says, one
/// after another (each load runs on every rank of the group). `Err` only when
/// the group could not be asked at all.
pub async fn sync(
    channel: Channel,
    wanted: &[Wanted],
    retired: &[String],
) -> Result<Vec<(String, Outcome)>, Status> {
    let info = InferenceClient::new(channel.clone())
        .model_info(pb::ModelInfoRequest::default())
        .await?
        .into_inner();
    let served: Vec<(String, String)> = info
        .adapters
        .into_iter()
        .map(|a| {
            let source = if a.source.is_empty() {
                a.path
            } else {
                a.source
            };
            (a.name, source)
        })
        .collect();
    let mut client = AdaptersClient::new(channel);
    let mut outcomes = Vec::new();
    for action in plan(&served, wanted, retired) {
        let (name, outcome) = match action {
            Action::Keep(name) => (name, Outcome::Kept),
            Action::Load { name, source } => {
                let request = pb::LoadAdapterRequest {
                    name: name.clone(),
                    path: source,
                    model: String::new(),
                };
                match client.load_adapter(request).await {
                    Ok(_) => (name, Outcome::Loaded),
                    Err(s) if s.code() == Code::Unavailable => return Err(s),
                    Err(s) => (name, Outcome::Failed(s.message().to_string())),
                }
            }
            Action::Unload(name) => {
                let request = pb::UnloadAdapterRequest {
                    name: name.clone(),
                    model: String::new(),
                };
                match client.unload_adapter(request).await {
                    Ok(_) => (name, Outcome::Unloaded),
                    Err(s) if s.code() == Code::NotFound => (name, Outcome::Unloaded),
                    Err(s) if s.code() == Code::Unavailable => return Err(s),
                    Err(s) => (name, Outcome::Failed(s.message().to_string())),
                }
            }
        };
        outcomes.push((name, outcome));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn missing_adapters_load_served_ones_stay_and_the_list_wins_a_name() {
        let served = pairs(&[
            ("sql", "hf://org/sql"),
            ("chat", "/tmp/other"),
            ("runtime", "/x"),
        ]);
        let wanted = pairs(&[
            ("sql", "hf://org/sql"),
            ("chat", "hf://org/chat"),
            ("new", "pip://p/a"),
        ]);
        assert_eq!(
            plan(&served, &wanted, &[]),
            vec![
                Action::Keep("sql".into()),
                // Loaded at run time from elsewhere under a name the list gives: replaced.
                Action::Load {
                    name: "chat".into(),
                    source: "hf://org/chat".into()
                },
                Action::Load {
                    name: "new".into(),
                    source: "pip://p/a".into()
                },
            ]
        );
    }

    #[test]
    fn only_names_the_list_dropped_are_unloaded() {
        let served = pairs(&[("old", "/a"), ("runtime", "/b")]);
        let actions = plan(&served, &[], &["old".into(), "gone-already".into()]);
        assert_eq!(actions, vec![Action::Unload("old".into())]);
    }
}
