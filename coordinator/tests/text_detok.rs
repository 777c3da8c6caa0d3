//! Incremental detokenisation over the fixture byte-level BPE tokenizer: deltas never end in a
//! broken character and concatenate to the full decode.

use std::sync::Arc;

use fathom_coordinator::text::{
    IncrementalDecoder, SpecialTokenMode, TextError, Tokenizer, encode_prompt, load_tokenizer,
};
use proptest::prelude::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text/tokenizer.json");

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(load_tokenizer(std::path::Path::new(FIXTURE)).expect("fixture tokenizer loads"))
}

/// Feeds `ids` one at a time; returns (deltas from `step`, text from `finish`).
fn stream(tok: &Arc<Tokenizer>, ids: &[u32], mode: SpecialTokenMode) -> (Vec<String>, String) {
    let mut dec = IncrementalDecoder::new(tok.clone(), mode);
    let deltas = ids.iter().map(|&id| dec.step(id).expect("known id")).collect();
    let tail = dec.finish().expect("finish");
    (deltas, tail)
}

#[test]
fn multibyte_text_streams_whole_characters() {
    let tok = tokenizer();
    let text = "你好世界😀 héllo été caé, the ring 🎉!";
    let ids = encode_prompt(&tok, text).unwrap();
    // The fixture splits characters across tokens: the test only means something if it does.
    let pieces: Vec<String> = ids.iter().map(|&id| tok.decode(&[id], false).unwrap()).collect();
    assert!(pieces.iter().any(|p| p.contains('\u{FFFD}')), "no split character in {pieces:?}");

    let (deltas, tail) = stream(&tok, &ids, SpecialTokenMode::Skip);
    for d in &deltas {
        assert!(!d.contains('\u{FFFD}'), "broken character emitted: {deltas:?}");
    }
    assert!(deltas.iter().any(String::is_empty), "some token must have been held back");
    assert_eq!(tail, "");
    assert_eq!(deltas.concat(), text);
    assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
}

#[test]
fn special_tokens_are_skipped_or_kept() {
    let tok = tokenizer();
    let ids =
        encode_prompt(&tok, "<｜begin▁of▁sentence｜>hé<think>x</think>😀<｜end▁of▁sentence｜>")
            .unwrap();
    assert_eq!(ids[0], 0);
    assert_eq!(*ids.last().unwrap(), 1);

    let (skip, tail) = stream(&tok, &ids, SpecialTokenMode::Skip);
    assert_eq!(skip.concat() + &tail, "héx😀");
    assert_eq!(skip.concat() + &tail, tok.decode(&ids, true).unwrap());

    let (keep, tail) = stream(&tok, &ids, SpecialTokenMode::Keep);
    assert_eq!(
        keep.concat() + &tail,
        "<｜begin▁of▁sentence｜>hé<think>x</think>😀<｜end▁of▁sentence｜>"
    );
    assert_eq!(keep[0], "<｜begin▁of▁sentence｜>", "a special token is emitted as soon as fed");
}

#[test]
fn truncated_character_is_flushed_by_finish_like_the_full_decode() {
    let tok = tokenizer();
    // "a" then the first byte of "é" (0xC3, byte token id 0xC3 + 2): the sequence ends mid-character.
    let ids = [b'a' as u32 + 2, 0xC3 + 2];
    let mut dec = IncrementalDecoder::new(tok.clone(), SpecialTokenMode::Skip);
    assert_eq!(dec.step(ids[0]).unwrap(), "a");
    assert_eq!(dec.step(ids[1]).unwrap(), "", "the lead byte is held back");
    assert_eq!(dec.pending(), 1);
    let tail = dec.finish().unwrap();
    assert_eq!(tail, "\u{FFFD}");
    assert_eq!(format!("a{tail}"), tok.decode(&ids, true).unwrap());
    assert_eq!(dec.finish().unwrap(), "", "finish twice emits nothing more");
}

#[test]
fn unknown_id_is_an_error_and_changes_nothing() {
    let tok = tokenizer();
    let mut dec = IncrementalDecoder::new(tok, SpecialTokenMode::Skip);
    assert_eq!(dec.step(b'h' as u32 + 2).unwrap(), "h");
    assert_eq!(dec.step(100_000), Err(TextError::UnknownTokenId { id: 100_000 }));
    assert_eq!(dec.ids().len(), 1);
    assert_eq!(dec.step(b'i' as u32 + 2).unwrap(), "i");
}

fn no_replacement_char() -> impl Strategy<Value = String> {
    // Any Unicode scalar values except U+FFFD itself (a literal U+FFFD would look like a broken
    // character to the assertion).
    proptest::collection::vec(any::<char>().prop_filter("no U+FFFD", |c| *c != '\u{FFFD}'), 0..40)
        .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random text → ids → streamed one id at a time: no delta holds a broken character, nothing
    /// is left for `finish`, and the deltas concatenate to the text (= the full decode).
    #[test]
    fn streamed_text_equals_full_decode(text in no_replacement_char()) {
        let tok = tokenizer();
        let ids = encode_prompt(&tok, &text).unwrap();
        let (deltas, tail) = stream(&tok, &ids, SpecialTokenMode::Skip);
        for d in &deltas {
            prop_assert!(!d.contains('\u{FFFD}'), "broken character in {:?}", deltas);
        }
        prop_assert_eq!(&tail, "");
        prop_assert_eq!(deltas.concat(), tok.decode(&ids, true).unwrap());
        prop_assert_eq!(deltas.concat(), text);
    }

    /// Random byte-token sequences (often invalid UTF-8): deltas never end in U+FFFD (a character
    /// that might still complete), and deltas + finish equal the full decode exactly.
    #[test]
    fn random_bytes_stream_equals_full_decode(
        bytes in proptest::collection::vec(0x00u32..0x100, 0..40)
    ) {
        let tok = tokenizer();
        let ids: Vec<u32> = bytes.iter().map(|b| b + 2).collect();
        let (deltas, tail) = stream(&tok, &ids, SpecialTokenMode::Skip);
        for d in &deltas {
            prop_assert!(!d.ends_with('\u{FFFD}'), "delta ends mid-character: {:?}", deltas);
        }
        prop_assert_eq!(deltas.concat() + &tail, tok.decode(&ids, true).unwrap());
    }
}
