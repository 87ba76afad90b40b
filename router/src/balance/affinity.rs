//! Prefix affinity: a hash of the prompt's first characters (or token ids)
//! and a bounded least-recently-used map from that hash to the backend that
//! served it last.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use shardserve_proto::v1::generate_request::Prompt;

/// Hash of the model name and the first `n` characters of the prompt's text
/// (chat: roles and contents in order; token ids: the first `n` ids).
pub(crate) fn prefix_key(model: &str, prompt: Option<&Prompt>, n: usize) -> u64 {
    let mut h = DefaultHasher::new();
    model.hash(&mut h);
    match prompt {
        None => {}
        Some(Prompt::Text(text)) => hash_chars(&mut h, [text.as_str()].into_iter(), n),
        Some(Prompt::Chat(chat)) => hash_chars(
            &mut h,
            chat.messages
                .iter()
                .flat_map(|m| [m.role.as_str(), "\n", m.content.as_str(), "\n"]),
            n,
        ),
        Some(Prompt::TokenIds(ids)) => ids.ids.iter().take(n).for_each(|id| id.hash(&mut h)),
    }
    h.finish()
}

fn hash_chars<'a>(h: &mut DefaultHasher, parts: impl Iterator<Item = &'a str>, n: usize) {
    let mut left = n;
    for part in parts {
        for c in part.chars() {
            if left == 0 {
                return;
            }
            c.hash(h);
            left -= 1;
        }
    }
}

/// Remembers the backend id that last served each prefix key; the least
/// recently used entry goes when `capacity` is reached.
pub(crate) struct PrefixLru {
    capacity: usize,
    entries: HashMap<u64, (String, u64)>,
    by_age: BTreeMap<u64, u64>,
    clock: u64,
}

impl PrefixLru {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            clock: 0,
        }
    }

    pub(crate) fn get(&self, key: u64) -> Option<&str> {
        self.entries.get(&key).map(|(id, _)| id.as_str())
    }

    /// Records that `backend` served `key` now.
    pub(crate) fn put(&mut self, key: u64, backend: &str) {
        self.clock += 1;
        if let Some((id, stamp)) = self.entries.get_mut(&key) {
            self.by_age.remove(stamp);
            *stamp = self.clock;
            if id != backend {
                *id = backend.to_string();
            }
        } else {
            if self.entries.len() >= self.capacity
                && let Some((_, oldest)) = self.by_age.pop_first()
            {
                self.entries.remove(&oldest);
            }
            self.entries.insert(key, (backend.to_string(), self.clock));
        }
        self.by_age.insert(self.clock, key);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use shardserve_proto::v1 as pb;

    use super::*;

    fn text(s: &str) -> Prompt {
        Prompt::Text(s.into())
    }

    #[test]
    fn same_prefix_same_key_and_only_the_prefix_counts() {
        let a = prefix_key("m", Some(&text("hello world, tell me")), 11);
        let b = prefix_key("m", Some(&text("hello world! something else")), 11);
        assert_eq!(a, b);
        assert_ne!(a, prefix_key("m", Some(&text("goodbye world")), 11));
        assert_ne!(a, prefix_key("other", Some(&text("hello world")), 11));
    }

    #[test]
    fn chat_prefix_covers_roles_and_contents() {
        let chat = |sys: &str, user: &str| {
            Prompt::Chat(pb::ChatPrompt {
                messages: vec![
                    pb::ChatMessage {
                        role: "system".into(),
                        content: sys.into(),
                    },
                    pb::ChatMessage {
                        role: "user".into(),
                        content: user.into(),
                    },
                ],
            })
        };
        let long = "x".repeat(300);
        assert_eq!(
            prefix_key("m", Some(&chat(&long, "a")), 256),
            prefix_key("m", Some(&chat(&long, "b")), 256)
        );
        assert_ne!(
            prefix_key("m", Some(&chat("s", "a")), 256),
            prefix_key("m", Some(&chat("s", "b")), 256)
        );
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut lru = PrefixLru::new(2);
        lru.put(1, "a");
        lru.put(2, "b");
        lru.put(1, "c"); // touches 1
        lru.put(3, "d"); // evicts 2
        assert_eq!(lru.get(1), Some("c"));
        assert_eq!(lru.get(2), None);
        assert_eq!(lru.get(3), Some("d"));
        assert_eq!(lru.len(), 2);
    }
}
