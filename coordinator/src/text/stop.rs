//! Text stop sequences over a stream of text deltas.
//!
//! A [`StopMatcher`] is fed deltas (as [`super::detok`] produces them) and releases text that
//! cannot belong to a stop sequence. Text that could be the start of one is withheld until a later
//! delta decides it; when a stop sequence completes, the text before it is released, the stop
//! string itself is not (OpenAI semantics), and the matcher is done.
//!
//! Invariants: the released text, concatenated, is the fed text cut just before the first stop
//! sequence (or all of it after [`StopMatcher::finish`] when none occurred), however the text was
//! split into deltas. "First" means the occurrence that *ends* first — the one a token-by-token
//! stream would see first — and among those ending at the same place the longest. Held-back text
//! is always a proper prefix of some stop string, so at most the longest stop's length minus one
//! byte is withheld. Cuts fall on character boundaries.

use super::TextError;

/// What one fed delta produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopEvent {
    /// Text released now (possibly empty when all of it is withheld).
    Text(String),
    /// A stop sequence completed: `text` is released now (what preceded the stop), `stop` is the
    /// index of the stop sequence, `after` is fed text that followed the stop string (not part of
    /// the output under OpenAI semantics; the reasoning splitter routes it to `content`).
    Stopped { text: String, stop: usize, after: String },
}

/// Matches stop sequences across delta boundaries.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (may be empty: then every delta passes through). An empty stop string
    /// is an error.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Result<Self, TextError> {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if let Some(index) = stops.iter().position(String::is_empty) {
            return Err(TextError::EmptyStop { index });
        }
        Ok(Self { stops, held: String::new(), stopped: false })
    }

    /// Feeds one delta. After a [`StopEvent::Stopped`], feeding more is an error.
    pub fn push(&mut self, delta: &str) -> Result<StopEvent, TextError> {
        if self.stopped {
            return Err(TextError::FedAfterStop);
        }
        self.held.push_str(delta);
        let buf = std::mem::take(&mut self.held);

        // (end, start, stop index) of the match that ends first, longest on ties.
        let first = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| buf.find(s.as_str()).map(|p| (p + s.len(), p, k)))
            .min();
        if let Some((end, start, stop)) = first {
            self.stopped = true;
            return Ok(StopEvent::Stopped {
                text: buf[..start].to_string(),
                stop,
                after: buf[end..].to_string(),
            });
        }

        let keep = self.withheld_len(&buf);
        let cut = buf.len() - keep;
        self.held = buf[cut..].to_string();
        let mut released = buf;
        released.truncate(cut);
        Ok(StopEvent::Text(released))
    }

    /// Ends the stream (generation stopped for another reason): returns the withheld text.
    /// Returns "" after a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Text currently withheld.
    pub fn held(&self) -> &str {
        &self.held
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Length of the longest suffix of `buf` that is a proper prefix of some stop string.
    fn withheld_len(&self, buf: &str) -> usize {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let earliest = buf.len().saturating_sub(longest.saturating_sub(1));
        buf.char_indices()
            .map(|(p, _)| p)
            .filter(|&p| p >= earliest)
            .find(|&p| self.stops.iter().any(|s| s.starts_with(&buf[p..])))
            .map_or(0, |p| buf.len() - p)
    }
}
