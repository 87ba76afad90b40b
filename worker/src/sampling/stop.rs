//! Stop strings over streamed text.
//!
//! Detokenised text arrives in deltas, and a stop string may straddle several
//! of them. The matcher holds back the longest tail that could still grow into
//! a stop string, so no byte of a stop string (or anything after it) ever
//! reaches the client. The match found is the one that completes first (ties:
//! the longest), which is the same whichever way the text was split.

/// What one [`StopMatcher::push`] lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that is safe to send now.
    pub emit: String,
    /// The stop string that matched; `emit` then holds the text before it.
    pub matched: Option<String>,
}

/// Watches streamed text for any of a request's stop strings.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet emitted: always a proper prefix of some stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let mut stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        stops.sort();
        stops.dedup();
        Self {
            stops,
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has matched; later input is ignored.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Feeds the next text delta. Returns what can be emitted now and, once a
    /// stop string matches, which one (then `emit` ends just before it).
    pub fn push(&mut self, delta: &str) -> StopStep {
        if self.stopped {
            return StopStep::default();
        }
        self.held.push_str(delta);
        if let Some((start, stop)) = self.first_match() {
            let mut emit = std::mem::take(&mut self.held);
            emit.truncate(start);
            self.stopped = true;
            return StopStep {
                emit,
                matched: Some(stop),
            };
        }
        let split = self.held.len() - self.partial_suffix_len();
        StopStep {
            emit: self.held.drain(..split).collect(),
            matched: None,
        }
    }

    /// At the end of generation: everything still held back.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// The start and the stop string of the match ending first in `held`,
    /// the longest among those ending at the same byte.
    fn first_match(&self) -> Option<(usize, String)> {
        self.stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()).map(|start| (start, stop)))
            .min_by_key(|(start, stop)| (start + stop.len(), *start))
            .map(|(start, stop)| (start, stop.clone()))
    }

    /// The length of the longest tail of `held` that is a proper prefix of a
    /// stop string. That tail starts where a stop string's first character
    /// does, so cutting there never splits a character.
    fn partial_suffix_len(&self) -> usize {
        let held = self.held.as_bytes();
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len().min(held.len() + 1)).rev().find(|&len| {
                    stop.is_char_boundary(len) && held.ends_with(&stop.as_bytes()[..len])
                })
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect())
    }

    /// The reference answer, found the slow way: the first end position at
    /// which some stop string is a suffix of the text so far (longest wins).
    fn expected(stops: &[&str], text: &str) -> (String, Option<String>) {
        for end in (1..=text.len()).filter(|&e| text.is_char_boundary(e)) {
            let done = &text[..end];
            let hit = stops
                .iter()
                .filter(|s| !s.is_empty() && done.ends_with(**s))
                .max_by_key(|s| s.len());
            if let Some(stop) = hit {
                return (done[..end - stop.len()].to_string(), Some(stop.to_string()));
            }
        }
        (text.to_string(), None)
    }

    /// Streams `chunks` through a fresh matcher; returns all text the client
    /// would see and the stop string that matched.
    fn stream(stops: &[&str], chunks: &[&str]) -> (String, Option<String>) {
        let mut m = matcher(stops);
        let mut seen = String::new();
        let mut matched = None;
        for chunk in chunks {
            let step = m.push(chunk);
            if matched.is_some() {
                assert_eq!(step, StopStep::default(), "output after the stop");
            }
            seen.push_str(&step.emit);
            matched = matched.or(step.matched);
        }
        if matched.is_none() {
            seen.push_str(&m.flush());
        }
        (seen, matched)
    }

    const CASES: &[(&[&str], &str)] = &[
        (&["<|end|>"], "Hello world<|end|>trailing"),
        (&["<|end|>"], "text <|e"),
        (&["</s>"], "a</s b</ c</"),
        (&["끝", "니다."], "안녕하세요 끝입니다. 다음"),
        (&["니다.", "세요 끝"], "안녕하세요 끝입니다. 다음"),
        (&["🛑", "👍🏽 d"], "ok 👍🏽 done 🛑 after"),
        (&["🛑"], "ok 👍🏽 done 🛑 after"),
        (&["abc", "ab"], "xxabcyy"),
        (&["abc", "bcd"], "xabcd"),
        (&["aab"], "aaaab!"),
        (&["b", "ab"], "xaby"),
        (&["STOP", "END"], "a ENDING b STOP"),
        (&["zz"], "no stop here: 한국어 🎉"),
    ];

    #[test]
    fn stop_string_split_across_deltas_is_never_emitted() {
        for &(stops, text) in CASES {
            let want = expected(stops, text);
            let bounds: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            // Every split into three deltas (two cut points, empty deltas included).
            for (n, &i) in bounds.iter().enumerate() {
                for &j in &bounds[n..] {
                    let chunks = [&text[..i], &text[i..j], &text[j..]];
                    assert_eq!(
                        stream(stops, &chunks),
                        want,
                        "{stops:?} split as {chunks:?}"
                    );
                }
            }
            // One character at a time.
            let chars: Vec<String> = text.chars().map(String::from).collect();
            let chars: Vec<&str> = chars.iter().map(String::as_str).collect();
            assert_eq!(stream(stops, &chars), want, "{stops:?} char by char");
        }
    }

    #[test]
    fn reference_answers_are_what_we_expect() {
        let yes = |s: &str, stop: &str| (s.to_string(), Some(stop.to_string()));
        assert_eq!(expected(&["abc", "ab"], "xxabcyy"), yes("xx", "ab"));
        assert_eq!(expected(&["abc", "bcd"], "xabcd"), yes("x", "abc"));
        assert_eq!(expected(&["b", "ab"], "xaby"), yes("x", "ab"));
        assert_eq!(
            expected(&["STOP", "END"], "a ENDING b STOP"),
            yes("a ", "END")
        );
        assert_eq!(
            expected(&["🛑"], "ok 👍🏽 done 🛑 after"),
            yes("ok 👍🏽 done ", "🛑")
        );
    }

    #[test]
    fn overlapping_prefixes_match_the_shorter_first() {
        let mut m = matcher(&["abc", "ab"]);
        assert_eq!(m.push("xxa").emit, "xx");
        let step = m.push("bc");
        assert_eq!(step.emit, "");
        assert_eq!(step.matched.as_deref(), Some("ab"));
    }

    #[test]
    fn multiple_stop_strings() {
        let mut m = matcher(&["STOP", "END", "</s>"]);
        assert_eq!(m.push("one E").emit, "one ");
        assert_eq!(m.push("ND? no, ENDS").emit, "");
        assert!(m.is_stopped());
        assert_eq!(m.push("more").emit, "");
        assert_eq!(m.flush(), "");

        let mut m = matcher(&["STOP", "END"]);
        let step = m.push("wait, STOP");
        assert_eq!(step.emit, "wait, ");
        assert_eq!(step.matched.as_deref(), Some("STOP"));
    }

    #[test]
    fn held_text_is_released_once_it_cannot_match() {
        let mut m = matcher(&["<|end|>"]);
        assert_eq!(m.push("Hello <").emit, "Hello ");
        assert_eq!(m.push("|e").emit, "");
        assert_eq!(m.push("x").emit, "<|ex");
        assert_eq!(m.push(" <|en").emit, " ");
        assert_eq!(m.flush(), "<|en");
    }

    #[test]
    fn no_or_empty_stops_pass_everything_through() {
        let mut m = matcher(&[]);
        assert_eq!(m.push("abc 가").emit, "abc 가");
        let mut m = matcher(&[""]);
        assert_eq!(m.push("abc").emit, "abc");
        assert!(!m.is_stopped());
    }
}
