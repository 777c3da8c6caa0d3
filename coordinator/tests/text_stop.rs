//! Stop sequences split across deltas at every position, the reasoning split (streamed and
//! whole), and tool-call parsing from completions.

use fathom_coordinator::text::{
    ChatTemplate, ReasoningSplitter, SpecialTokens, StopEvent, StopMatcher, TextError,
    load_tokenizer,
};
use proptest::prelude::*;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text/tokenizer.json");

fn template() -> ChatTemplate {
    let tok = load_tokenizer(std::path::Path::new(FIXTURE)).unwrap();
    ChatTemplate::new(SpecialTokens::from_tokenizer(&tok).unwrap())
}

/// Result of streaming `deltas`: (released text, index of the stop that fired).
fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
    let mut m = StopMatcher::new(stops.iter().copied()).unwrap();
    let mut out = String::new();
    for d in deltas {
        match m.push(d).unwrap() {
            StopEvent::Text(t) => out.push_str(&t),
            StopEvent::Stopped { text, stop, .. } => {
                out.push_str(&text);
                assert_eq!(m.push("more"), Err(TextError::FedAfterStop));
                return (out, Some(stop));
            }
        }
    }
    out.push_str(&m.finish());
    (out, None)
}

/// Every way to cut `text` into 1, 2 or 3 deltas, at character boundaries.
fn splits(text: &str) -> Vec<Vec<&str>> {
    let cuts: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let mut all = vec![vec![text]];
    for &a in &cuts {
        for &b in cuts.iter().filter(|&&b| b >= a) {
            all.push(vec![&text[..a], &text[a..b], &text[b..]]);
        }
        all.push(vec![&text[..a], &text[a..]]);
    }
    all
}

#[test]
fn stop_found_at_every_split_position() {
    for (text, stops, want) in [
        ("Hello, world! STOP here", &["STOP"][..], "Hello, world! "),
        ("你好世界!", &["世界"][..], "你好"),
        ("aaab", &["aab"][..], "a"),
        ("x😀y END", &["END", "😀z"][..], "x😀y "),
    ] {
        for deltas in splits(text) {
            let (got, stop) = run(stops, &deltas);
            assert_eq!(got, want, "deltas {deltas:?}");
            assert!(stop.is_some(), "deltas {deltas:?}");
        }
    }
}

#[test]
fn partial_stop_is_released_when_it_cannot_match() {
    for deltas in splits("Hello ST, STO") {
        let (got, stop) = run(&["STOP"], &deltas);
        assert_eq!((got.as_str(), stop), ("Hello ST, STO", None), "deltas {deltas:?}");
    }
    let mut m = StopMatcher::new(["STOP"]).unwrap();
    assert_eq!(m.push("ab S").unwrap(), StopEvent::Text("ab ".into()));
    assert_eq!(m.held(), "S");
    assert_eq!(m.push("Tx").unwrap(), StopEvent::Text("STx".into()));
    assert_eq!(m.held(), "");
}

#[test]
fn the_stop_that_ends_first_wins_whatever_the_split() {
    // "b" completes before "abc" does, so a token-by-token stream stops at "b".
    for deltas in splits("xabc") {
        assert_eq!(run(&["abc", "b"], &deltas), ("xa".to_string(), Some(1)), "{deltas:?}");
    }
    // Both end at the same place: the longer one wins.
    for deltas in splits("xabc") {
        assert_eq!(run(&["bc", "abc"], &deltas), ("x".to_string(), Some(1)), "{deltas:?}");
    }
}

#[test]
fn stopped_event_carries_text_after_the_stop() {
    let mut m = StopMatcher::new(["<end>"]).unwrap();
    assert_eq!(m.push("a<e").unwrap(), StopEvent::Text("a".into()));
    assert_eq!(
        m.push("nd>tail").unwrap(),
        StopEvent::Stopped { text: String::new(), stop: 0, after: "tail".into() }
    );
    assert!(m.is_stopped());
    assert_eq!(m.finish(), "");
}

#[test]
fn empty_stop_is_rejected_and_no_stops_pass_through() {
    assert_eq!(StopMatcher::new(["a", ""]).unwrap_err(), TextError::EmptyStop { index: 1 });
    let mut m = StopMatcher::new(Vec::<String>::new()).unwrap();
    assert_eq!(m.push("anything").unwrap(), StopEvent::Text("anything".into()));
}

proptest! {
    /// Random text over a small alphabet cut into random deltas gives the same result as the
    /// reference on the whole text: cut before the stop occurrence that ends first.
    #[test]
    fn random_splits_match_reference(
        chars in proptest::collection::vec(prop_oneof![Just('a'), Just('b'), Just('é'), Just('😀')], 0..24),
        cuts in proptest::collection::vec(0usize..24, 0..6),
    ) {
        let text: String = chars.into_iter().collect();
        let stops = ["abé", "😀😀", "bb"];
        let reference = stops
            .iter()
            .enumerate()
            .filter_map(|(k, s)| text.find(s).map(|p| (p + s.len(), p, k)))
            .min()
            .map_or((text.clone(), None), |(_, p, k)| (text[..p].to_string(), Some(k)));
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let mut at: Vec<usize> = cuts.iter().map(|c| bounds[c % bounds.len()]).collect();
        at.sort();
        let mut deltas = Vec::new();
        let mut prev = 0;
        for c in at.into_iter().chain([text.len()]) {
            deltas.push(&text[prev..c]);
            prev = c;
        }
        prop_assert_eq!(run(&stops, &deltas), reference);
    }
}

#[test]
fn reasoning_split_streamed_at_every_position() {
    let text = "Let me think: 好.</think>It is 2.";
    for deltas in splits(text) {
        let mut s = ReasoningSplitter::new("</think>", true);
        let (mut reasoning, mut content) = (String::new(), String::new());
        for d in &deltas {
            let out = s.push(d);
            reasoning.push_str(&out.reasoning);
            content.push_str(&out.content);
        }
        let out = s.finish();
        reasoning.push_str(&out.reasoning);
        content.push_str(&out.content);
        assert_eq!((reasoning.as_str(), content.as_str()), ("Let me think: 好.", "It is 2."));
        assert!(!s.in_reasoning());
    }
}

#[test]
fn reasoning_split_without_thinking_or_without_end_marker() {
    let mut chat = template().reasoning_splitter(false);
    let out = chat.push("a</think>b");
    assert_eq!((out.reasoning.as_str(), out.content.as_str()), ("", "a</think>b"));

    let mut cut = template().reasoning_splitter(true);
    assert_eq!(cut.push("still thinking </thi").reasoning, "still thinking ");
    assert_eq!(cut.finish().reasoning, "</thi", "a partial marker at the end is reasoning");
}

#[test]
fn parse_completion_splits_reasoning_and_content() {
    let t = template();
    let p = t.parse_completion("Add.</think>It is 2.<｜end▁of▁sentence｜>", true).unwrap();
    assert_eq!(p.reasoning_content.as_deref(), Some("Add."));
    assert_eq!(p.content, "It is 2.");
    assert!(p.tool_calls.is_empty());

    let p = t.parse_completion("cut off by max_tokens", true).unwrap();
    assert_eq!(p.reasoning_content.as_deref(), Some("cut off by max_tokens"));
    assert_eq!(p.content, "");

    let p = t.parse_completion("Plain answer", false).unwrap();
    assert_eq!((p.reasoning_content, p.content.as_str()), (None, "Plain answer"));
}

#[test]
fn parse_completion_reads_dsml_tool_calls() {
    let t = template();
    let text = "Why.</think>Checking.\n\n<｜DSML｜function_calls>\n\
<｜DSML｜invoke name=\"get_weather\">\n\
<｜DSML｜parameter name=\"city\" string=\"true\">Paris \"FR\"</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"days\" string=\"false\">[1, 2]</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n\
</｜DSML｜function_calls><｜end▁of▁sentence｜>";
    let p = t.parse_completion(text, true).unwrap();
    assert_eq!(p.reasoning_content.as_deref(), Some("Why."));
    assert_eq!(p.content, "Checking.");
    assert_eq!(p.tool_calls.len(), 2);
    assert_eq!(p.tool_calls[0].function.name, "get_weather");
    assert_eq!(p.tool_calls[0].function.arguments, r#"{"city": "Paris \"FR\"", "days": [1, 2]}"#);
    assert_eq!(p.tool_calls[1].function.name, "now");
    assert_eq!(p.tool_calls[1].function.arguments, "{}");

    let bad = "x\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"f\">\n\
<｜DSML｜parameter name=\"n\" string=\"false\">not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
</｜DSML｜function_calls>";
    let err = t.parse_completion(bad, false).unwrap_err();
    assert!(
        matches!(&err, TextError::MalformedToolCall { reason } if reason.contains("\"n\"")),
        "{err:?}"
    );
}
