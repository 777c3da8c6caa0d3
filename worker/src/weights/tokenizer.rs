//! The byte-level test tokenizer written beside synthetic checkpoints (`tokenizer.json`, loaded
//! by the `tokenizers` crate 0.22 like DeepSeek's own file).
//!
//! Layout (all ids below the tiny preset's vocab of 512):
//! - 0 = `<｜begin▁of▁sentence｜>` (BOS), 1 = `<｜end▁of▁sentence｜>` (EOS), as in DeepSeek;
//! - 2..258 = the 256 bytes, byte `b` at id `2 + b`, spelled with GPT-2's byte-to-unicode map
//!   (ByteLevel pre-tokenizer and decoder; BPE with no merges), so any UTF-8 text round-trips
//!   and every byte is one token;
//! - 258.. = the chat and tool special tokens of [`SPECIAL_TOKENS`], in that order.
//!
//! Model ids above the tokenizer's vocabulary exist (the embedding has `vocab_size` rows) but are
//! never produced by encoding, as with DeepSeek's padded vocabulary.

use serde_json::{Value, json};

/// BOS text (id 0).
pub const BOS: &str = "<｜begin▁of▁sentence｜>";
/// EOS text (id 1).
pub const EOS: &str = "<｜end▁of▁sentence｜>";
/// First id of a byte token: byte `b` is id `BYTE_BASE + b`.
pub const BYTE_BASE: u32 = 2;

/// Special tokens after the bytes, id `258 + index`.
pub const SPECIAL_TOKENS: &[&str] = &[
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
    "<|EOT|>",
    "<｜fim▁hole｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁end｜>",
    "<｜▁pad▁｜>",
];

/// Id of special token `text` in the synthetic tokenizer (BOS, EOS or one of [`SPECIAL_TOKENS`]).
pub fn special_id(text: &str) -> Option<u32> {
    match text {
        BOS => Some(0),
        EOS => Some(1),
        _ => SPECIAL_TOKENS.iter().position(|t| *t == text).map(|i| BYTE_BASE + 256 + i as u32),
    }
}

/// GPT-2's reversible byte → printable char map used by the ByteLevel pre-tokenizer.
pub fn byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid char")
}

fn added(id: u32, content: &str) -> Value {
    json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    })
}

/// The `tokenizer.json` text; fails if `vocab_size` cannot hold every id.
pub fn synth_tokenizer_json(vocab_size: usize) -> Result<String, String> {
    let needed = BYTE_BASE as usize + 256 + SPECIAL_TOKENS.len();
    if vocab_size < needed {
        return Err(format!(
            "vocab_size {vocab_size} is below the {needed} ids of the synthetic tokenizer"
        ));
    }
    let mut vocab = serde_json::Map::new();
    let mut added_tokens = vec![added(0, BOS), added(1, EOS)];
    vocab.insert(BOS.into(), 0.into());
    vocab.insert(EOS.into(), 1.into());
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), (BYTE_BASE + b as u32).into());
    }
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        let id = BYTE_BASE + 256 + i as u32;
        vocab.insert((*t).into(), id.into());
        added_tokens.push(added(id, t));
    }
    let byte_level = json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    Ok(serde_json::to_string_pretty(&doc).expect("json"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::Tokenizer;

    fn load() -> Tokenizer {
        Tokenizer::from_bytes(synth_tokenizer_json(512).unwrap().as_bytes()).unwrap()
    }

    #[test]
    fn byte_map_is_a_bijection() {
        let chars: std::collections::HashSet<char> = (0..=255).map(byte_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_char(b'A'), 'A');
        assert_eq!(byte_char(b' '), 'Ġ');
        assert_eq!(byte_char(b'\n'), 'Ċ');
    }

    #[test]
    fn round_trips_ascii_and_multibyte_text() {
        let tok = load();
        for text in ["Hello, world!\n  indented\ttab", "Grüße, 世界 🌊 — ok", "a", ""] {
            let enc = tok.encode(text, false).unwrap();
            // One token per byte, ids 2 + byte.
            let expect: Vec<u32> = text.bytes().map(|b| BYTE_BASE + b as u32).collect();
            assert_eq!(enc.get_ids(), &expect[..], "{text:?}");
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        assert!(tok.get_vocab_size(true) < 512);
    }

    #[test]
    fn special_tokens_encode_to_their_ids() {
        let tok = load();
        let enc = tok.encode(format!("{BOS}<｜User｜>hi<｜Assistant｜><think>"), false).unwrap();
        let user = special_id("<｜User｜>").unwrap();
        assert_eq!(user, 258);
        assert_eq!(
            enc.get_ids(),
            &[0, user, BYTE_BASE + b'h' as u32, BYTE_BASE + b'i' as u32, 259, 260]
        );
        for t in [BOS, EOS].iter().chain(SPECIAL_TOKENS) {
            let id = special_id(t).unwrap();
            assert_eq!(tok.token_to_id(t), Some(id), "{t}");
            assert_eq!(tok.encode(*t, false).unwrap().get_ids(), &[id], "{t}");
            assert_eq!(tok.decode(&[id], false).unwrap(), *t);
        }
        assert_eq!(tok.decode(&[0, 2 + b'x' as u32, 1], true).unwrap(), "x");
        assert!(synth_tokenizer_json(200).is_err());
    }
}
