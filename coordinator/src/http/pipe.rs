//! Generated tokens → the text an OpenAI response carries, one engine chunk at a time.
//!
//! Per token: count it, keep its logprobs, and (unless it is the EOS that ended generation)
//! decode it with its own incremental decoder (special tokens kept as text, as the gRPC
//! `text_delta` is, so `</think>` survives for the reasoning split). The text then passes the
//! request's stop sequences ([`StopMatcher`]: the stop string itself is not output) and, for chat,
//! the reasoning split ([`ReasoningSplitter`]).
//!
//! Logprobs carry each token's own text and its raw bytes (for byte-level vocabularies the bytes
//! the token stands for, so a character split over tokens can be put back together).
//!
//! Invariants: after a stop sequence matched no more tokens are taken (the caller drops the
//! engine stream, which cancels the request); the concatenated output equals the gRPC path's
//! `text_delta`s for the same tokens, minus the terminating EOS text, cut at the first stop.

use crate::engine::detok::TextCodec;
use crate::text::{IncrementalDecoder, ReasoningSplitter, SpecialTokenMode, StopMatcher};
use fathom_proto::v1::GenerateChunk;

/// A token as logprobs show it: its text alone (a byte of a split character decodes to U+FFFD)
/// and its raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

/// One generated token's logprob and its alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

/// What one step of the pipe produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Piece {
    pub reasoning: String,
    pub content: String,
    pub logprobs: Vec<TokenLogprob>,
}

impl Piece {
    pub fn append(&mut self, other: Piece) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.logprobs.extend(other.logprobs);
    }

    pub fn is_empty(&self) -> bool {
        self.reasoning.is_empty() && self.content.is_empty() && self.logprobs.is_empty()
    }
}

/// The per-request text pipeline.
#[derive(Debug)]
pub struct Pipe {
    codec: Option<TextCodec>,
    decoder: Option<IncrementalDecoder>,
    /// Ids never rendered (the model's EOS, which ends generation).
    hidden: Vec<u32>,
    stop: StopMatcher,
    splitter: ReasoningSplitter,
    want_logprobs: bool,
    /// A stop sequence matched.
    stopped: bool,
    /// Tokens taken.
    tokens: u32,
    /// All text output (reasoning and content, in order).
    raw: String,
}

impl Pipe {
    /// `think_end` is the reasoning marker (used when `thinking`).
    pub fn new(
        codec: Option<TextCodec>,
        hidden: Vec<u32>,
        stops: &[String],
        think_end: &str,
        thinking: bool,
        want_logprobs: bool,
    ) -> Self {
        Self {
            decoder: codec.as_ref().map(|c| c.decoder(SpecialTokenMode::Keep)),
            codec,
            hidden,
            // Stops were checked when the request was parsed.
            stop: StopMatcher::new(stops.iter().cloned()).expect("validated stop sequences"),
            splitter: ReasoningSplitter::new(think_end, thinking),
            want_logprobs,
            stopped: false,
            tokens: 0,
            raw: String::new(),
        }
    }

    /// Whether a stop sequence ended the output.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens taken (the completion's token count).
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// All output text so far (reasoning then content, unsplit).
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Takes one engine chunk.
    pub fn chunk(&mut self, c: &GenerateChunk) -> Piece {
        let mut piece = Piece::default();
        for (k, &id) in c.token_ids.iter().enumerate() {
            if self.stopped {
                break;
            }
            self.tokens += 1;
            if self.want_logprobs
                && let Some(lp) = c.logprobs.get(k)
            {
                piece.logprobs.push(TokenLogprob {
                    token: self.token_text(id),
                    logprob: lp.logprob,
                    top: lp.top.iter().map(|t| (self.token_text(t.token_id), t.logprob)).collect(),
                });
            }
            if self.hidden.contains(&id) {
                continue;
            }
            // An id the tokenizer does not define (padded vocabulary) adds no text, as in gRPC.
            let delta = match self.decoder.as_mut() {
                Some(d) => d.step(id).unwrap_or_default(),
                None => String::new(),
            };
            self.feed(&delta, &mut piece);
        }
        piece
    }

    /// Ends the output (the engine finished): flushes held-back text.
    pub fn finish(&mut self) -> Piece {
        let mut piece = Piece::default();
        if !self.stopped {
            let tail = self.decoder.as_mut().and_then(|d| d.finish().ok()).unwrap_or_default();
            self.feed(&tail, &mut piece);
        }
        if !self.stopped {
            let held = self.stop.finish();
            self.route(&held, &mut piece);
            let d = self.splitter.finish();
            piece.reasoning.push_str(&d.reasoning);
        }
        piece
    }

    fn feed(&mut self, delta: &str, piece: &mut Piece) {
        match self.stop.push(delta) {
            Ok(crate::text::StopEvent::Text(t)) => self.route(&t, piece),
            Ok(crate::text::StopEvent::Stopped { text, .. }) => {
                self.route(&text, piece);
                self.stopped = true;
                let d = self.splitter.finish();
                piece.reasoning.push_str(&d.reasoning);
            }
            // Only fed while not stopped.
            Err(_) => {}
        }
    }

    fn route(&mut self, text: &str, piece: &mut Piece) {
        if text.is_empty() {
            return;
        }
        self.raw.push_str(text);
        let d = self.splitter.push(text);
        piece.reasoning.push_str(&d.reasoning);
        piece.content.push_str(&d.content);
    }

    fn token_text(&self, id: u32) -> TokenText {
        let Some(codec) = self.codec.as_ref() else {
            return TokenText { text: String::new(), bytes: Vec::new() };
        };
        let text = codec.decode(&[id]);
        let tok = codec.tokenizer();
        let added = tok.get_added_tokens_decoder().contains_key(&id);
        // A byte-level vocabulary entry spells its bytes with GPT-2's byte → char map; anything
        // else (added tokens, other vocabularies) is shown by its decoded text.
        let bytes = match tok.id_to_token(id) {
            Some(piece) if !added => byte_level_bytes(&piece),
            _ => None,
        }
        .unwrap_or_else(|| text.as_bytes().to_vec());
        TokenText { text, bytes }
    }
}

/// The bytes a byte-level BPE piece stands for, or `None` when a char is outside the byte-level
/// alphabet. The alphabet (GPT-2's): the printable bytes 33..=126, 161..=172 and 174..=255 stand
/// for themselves; the other 68 bytes, in increasing order, are chars 256, 257, ….
fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    piece
        .chars()
        .map(|c| {
            let c = c as u32;
            if c < 256 {
                return printable(c).then_some(c as u8);
            }
            let rank = c - 256;
            (0u32..256).filter(|&b| !printable(b)).nth(rank as usize).map(|b| b as u8)
        })
        .collect()
}
