//! Chat-format rendering against hand-written expected strings (each test names the rule of
//! DeepSeek's `encoding_dsv32.py` it checks), special-token loading, and request validation.

use fathom_coordinator::text::{
    ChatMessage, ChatRequest, ChatTemplate, OrderedJson, SpecialTokens, TextError, Tokenizer,
    encode_prompt, load_tokenizer,
};
use serde_json::json;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/text/tokenizer.json");
const B: &str = "<｜begin▁of▁sentence｜>";
const E: &str = "<｜end▁of▁sentence｜>";
const U: &str = "<｜User｜>";
const A: &str = "<｜Assistant｜>";

fn tokenizer() -> Tokenizer {
    load_tokenizer(std::path::Path::new(FIXTURE)).expect("fixture tokenizer loads")
}

fn template() -> ChatTemplate {
    ChatTemplate::new(SpecialTokens::from_tokenizer(&tokenizer()).expect("special tokens"))
}

fn render(messages: Vec<ChatMessage>, thinking: bool) -> Result<String, TextError> {
    template().render(&ChatRequest { messages, tools: vec![], thinking })
}

#[test]
fn special_tokens_come_from_added_tokens() {
    let t = SpecialTokens::from_tokenizer(&tokenizer()).unwrap();
    assert_eq!((t.bos.id, t.bos.content.as_str()), (0, B));
    assert_eq!((t.eos.id, t.eos.content.as_str()), (1, E));
    assert_eq!(t.user.id, 277);
    assert_eq!(t.assistant.id, 278);
    assert_eq!((t.think_start.id, t.think_start.content.as_str()), (279, "<think>"));
    assert_eq!((t.think_end.id, t.think_end.content.as_str()), (280, "</think>"));
    assert!(t.think_end.special);
}

#[test]
fn missing_special_token_is_named() {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    added.retain(|t| t["content"] != "</think>");
    let tok = Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap();
    let err = SpecialTokens::from_tokenizer(&tok).unwrap_err();
    assert_eq!(err, TextError::MissingSpecialToken { token: "</think>" });
    assert!(err.to_string().contains("</think>"), "{err}");
}

#[test]
fn missing_tokenizer_file_is_named() {
    let err = load_tokenizer(std::path::Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/tokenizer.json"), "{err}");
}

/// Rules: BOS first; user turn `<｜User｜>{c}<｜Assistant｜>`; chat mode closes with `</think>`.
#[test]
fn single_turn_chat_mode() {
    let got = render(vec![ChatMessage::user("Hi")], false).unwrap();
    assert_eq!(got, format!("{B}{U}Hi{A}</think>"));
}

/// Rule: in thinking mode the last user turn is followed by `<think>`.
#[test]
fn single_turn_thinking_mode() {
    let got = render(vec![ChatMessage::user("Hi")], true).unwrap();
    assert_eq!(got, format!("{B}{U}Hi{A}<think>"));
}

/// Rule: a system message is its bare text right after BOS (no markers around it).
#[test]
fn system_text_follows_bos() {
    let got = render(vec![ChatMessage::system("You are terse."), ChatMessage::user("Hi")], false)
        .unwrap();
    assert_eq!(got, format!("{B}You are terse.{U}Hi{A}</think>"));
}

fn two_turns() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system("S"),
        ChatMessage::user("1+1?"),
        ChatMessage::assistant_reasoning("add them", "2"),
        ChatMessage::user("times 3?"),
    ]
}

/// Rules: an earlier assistant turn is `{content}<｜end▁of▁sentence｜>`; chat mode never renders
/// reasoning; every user turn gets `</think>`.
#[test]
fn multi_turn_chat_mode_drops_reasoning() {
    let got = render(two_turns(), false).unwrap();
    assert_eq!(got, format!("{B}S{U}1+1?{A}</think>2{E}{U}times 3?{A}</think>"));
}

/// Rules: thinking mode only opens `<think>` after the *last* user turn; earlier user turns get
/// `</think>` and the reasoning of earlier assistant turns is dropped.
#[test]
fn multi_turn_thinking_mode_keeps_only_last_turn_open() {
    let got = render(two_turns(), true).unwrap();
    assert_eq!(got, format!("{B}S{U}1+1?{A}</think>2{E}{U}times 3?{A}<think>"));
}

fn weather_call() -> ChatMessage {
    let mut m = ChatMessage::assistant_tool_calls(&[(
        "get_weather",
        r#"{"city": "Paris", "days": 2, "units": ["C", "F"], "o": {"z": 1, "a": null}}"#,
    )]);
    m.reasoning_content = Some("need the tool".to_string());
    m
}

const WEATHER_DSML: &str = "\n\n<｜DSML｜function_calls>\n\
<｜DSML｜invoke name=\"get_weather\">\n\
<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"days\" string=\"false\">2</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"units\" string=\"false\">[\"C\", \"F\"]</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"o\" string=\"false\">{\"z\": 1, \"a\": null}</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n\
</｜DSML｜function_calls>";

/// Rules: in thinking mode an assistant turn after the last user turn is
/// `{reasoning}</think>{content}{dsml}<｜end▁of▁sentence｜>`; DSML parameters keep argument order
/// (nested objects too), strings raw with string="true", other values as Python-style JSON with string="false"; tool
/// results are wrapped in `<function_results>` and followed by `\n\n<think>` in thinking mode.
#[test]
fn tool_loop_thinking_mode() {
    let msgs = vec![ChatMessage::user("Weather?"), weather_call(), ChatMessage::tool("sunny")];
    let got = render(msgs, true).unwrap();
    let want = format!(
        "{B}{U}Weather?{A}<think>need the tool</think>{WEATHER_DSML}{E}\
         \n\n<function_results>\n<result>sunny</result>\n</function_results>\n\n<think>"
    );
    assert_eq!(got, want);
}

/// Rules: chat mode renders no reasoning even in the tool loop; several results share one
/// `<function_results>` block, in call order; after them `\n\n</think>`.
#[test]
fn tool_loop_chat_mode_two_calls() {
    let call = ChatMessage::assistant_tool_calls(&[("a", r#"{"b": 1, "a": true}"#), ("z", "{}")]);
    let msgs = vec![ChatMessage::user("Q"), call, ChatMessage::tool("r1"), ChatMessage::tool("r2")];
    let got = render(msgs, false).unwrap();
    let want = format!(
        "{B}{U}Q{A}</think>\n\n<｜DSML｜function_calls>\n\
         <｜DSML｜invoke name=\"a\">\n\
         <｜DSML｜parameter name=\"b\" string=\"false\">1</｜DSML｜parameter>\n\
         <｜DSML｜parameter name=\"a\" string=\"false\">true</｜DSML｜parameter>\n\
         </｜DSML｜invoke>\n\
         <｜DSML｜invoke name=\"z\">\n\n</｜DSML｜invoke>\n\
         </｜DSML｜function_calls>{E}\
         \n\n<function_results>\n<result>r1</result>\n<result>r2</result>\n</function_results>\
         \n\n</think>"
    );
    assert_eq!(got, want);
}

/// Rule: tools render as the tools section appended (after `\n\n`) to the system message, with
/// each function schema as one line of Python-style JSON inside `<functions>`.
#[test]
fn tools_section_follows_system_text() {
    // Key order is the document's (not sorted): "name" before "description".
    let tool: OrderedJson = serde_json::from_str(
        r#"{"type": "function", "function": {"name": "get_weather", "description": "天气",
            "parameters": {"type": "object"}}}"#,
    )
    .unwrap();
    let req = ChatRequest {
        messages: vec![ChatMessage::system("S"), ChatMessage::user("Q")],
        tools: vec![tool.clone()],
        thinking: false,
    };
    let got = template().render(&req).unwrap();
    let head = format!("{B}S\n\n## Tools\n\nYou have access to a set of tools");
    assert!(got.starts_with(&head), "{got}");
    let tail = format!(
        "<think>...thinking about results</think>\n\nHere are the functions available in \
         JSONSchema format:\n<functions>\n{{\"name\": \"get_weather\", \"description\": \
         \"天气\", \"parameters\": {{\"type\": \"object\"}}}}\n</functions>\n{U}Q{A}</think>"
    );
    assert!(got.ends_with(&tail), "{got}");
    assert!(got.contains("<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">"));

    // Without a system message the section stands alone right after BOS.
    let req = ChatRequest { messages: vec![ChatMessage::user("Q")], tools: vec![tool], ..req };
    let got = template().render(&req).unwrap();
    assert!(got.starts_with(&format!("{B}\n\n## Tools\n\n")), "{got}");
    assert!(got.ends_with(&tail), "{got}");
}

#[test]
fn rendered_prompt_encodes_to_special_ids_and_decodes_back() {
    let tok = tokenizer();
    let prompt = render(two_turns(), true).unwrap();
    let ids = encode_prompt(&tok, &prompt).unwrap();
    assert_eq!(&ids[..2], &[0, b'S' as u32 + 2]);
    assert_eq!(ids[2], 277, "<｜User｜> is one token");
    assert_eq!(*ids.last().unwrap(), 279, "prompt ends with the <think> token");
    assert!(ids.contains(&1) && ids.contains(&278) && ids.contains(&280));
    assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
}

#[test]
fn requests_deserialise_from_openai_json() {
    let req: ChatRequest = serde_json::from_value(json!({
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
              "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
        ],
        "thinking": false
    }))
    .unwrap();
    let got = template().render(&req).unwrap();
    assert!(got.ends_with("<result>ok</result>\n</function_results>\n\n</think>"), "{got}");
}

#[test]
fn invalid_requests_are_named() {
    let t = template();
    let r = |messages: Vec<ChatMessage>, thinking| {
        t.render(&ChatRequest { messages, tools: vec![], thinking }).unwrap_err()
    };
    assert_eq!(r(vec![], false), TextError::EmptyMessages);

    let dev = ChatMessage { role: "developer".into(), ..ChatMessage::user("x") };
    let err = r(vec![ChatMessage::user("a"), dev], false);
    assert_eq!(err, TextError::UnknownRole { index: 1, role: "developer".into() });
    assert!(err.to_string().contains("\"developer\""), "{err}");

    let no_content = ChatMessage { content: None, ..ChatMessage::user("x") };
    assert_eq!(r(vec![no_content], false), TextError::MissingContent { index: 0, role: "user" });
    assert_eq!(
        r(vec![ChatMessage::user("a"), ChatMessage::tool("r")], false),
        TextError::ToolWithoutCall { index: 1 }
    );
    let two = ChatMessage::assistant_tool_calls(&[("f", "{}"), ("g", "{}")]);
    assert_eq!(
        r(
            vec![
                ChatMessage::user("a"),
                two.clone(),
                ChatMessage::tool("r"),
                ChatMessage::user("b")
            ],
            false
        ),
        TextError::ToolResultCount { index: 1, calls: 2, results: 1 }
    );
    assert_eq!(
        r(vec![ChatMessage::user("a"), two, ChatMessage::tool("r")], false),
        TextError::ToolResultCount { index: 1, calls: 2, results: 1 }
    );
    assert_eq!(
        r(vec![ChatMessage::user("a"), ChatMessage::assistant("b")], false),
        TextError::NotAwaitingAssistant { role: "assistant" }
    );
    let bad_args = ChatMessage::assistant_tool_calls(&[("f", "[1, 2]")]);
    let err = r(vec![ChatMessage::user("a"), bad_args, ChatMessage::tool("r")], false);
    assert!(
        matches!(&err, TextError::ToolCallArguments { index: 1, name, .. } if name == "f"),
        "{err:?}"
    );
    let mut user_calls = ChatMessage::user("a");
    user_calls.tool_calls = ChatMessage::assistant_tool_calls(&[("f", "{}")]).tool_calls;
    assert_eq!(
        r(vec![user_calls], false),
        TextError::ToolCallsOnNonAssistant { index: 0, role: "user" }
    );
    // Thinking mode: an assistant turn after the last user turn needs reasoning or tool calls.
    let msgs = vec![
        ChatMessage::user("a"),
        ChatMessage::assistant("plain"),
        ChatMessage::assistant_tool_calls(&[("f", "{}")]),
        ChatMessage::tool("r"),
    ];
    assert_eq!(r(msgs.clone(), true), TextError::MissingReasoning { index: 1 });
    let chat = ChatRequest { messages: msgs, tools: vec![], thinking: false };
    assert!(t.render(&chat).is_ok(), "chat mode renders no reasoning, so none is required");
    let tools = ChatRequest {
        messages: vec![ChatMessage::user("a")],
        tools: vec![json!({"type": "function"}).into()],
        thinking: false,
    };
    assert_eq!(t.render(&tools).unwrap_err(), TextError::InvalidTool { index: 0 });
}
