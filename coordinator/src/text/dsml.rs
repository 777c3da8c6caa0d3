//! The "｜DSML｜" tool-call markup of DeepSeek-V3.2 and the JSON it embeds.
//!
//! Owns: the tools section of the system prompt, rendering an assistant's tool calls as DSML,
//! and parsing DSML tool calls back out of generated text. JSON inside the markup is written by
//! [`OrderedJson`] the way DeepSeek's Python writes it (document key order, `json.dumps`
//! separators, non-ASCII kept), since that is what the model was trained on.

use super::TextError;
use super::json::OrderedJson;

/// The markup's marker (plain text, not an added token).
pub const DSML: &str = "｜DSML｜";

fn py_string(s: &str) -> String {
    OrderedJson::String(s.to_string()).to_python_string()
}

/// The tools section appended to the system prompt. `schemas` are the `function` objects of the
/// OpenAI tools. The text is the format's fixed prompt (the model was trained on it verbatim).
pub fn render_tools(schemas: &[&OrderedJson], think_start: &str, think_end: &str) -> String {
    let schemas: Vec<String> = schemas.iter().map(|s| s.to_python_string()).collect();
    let d = DSML;
    format!(
        "## Tools\n\n\
You have access to a set of tools you can use to answer the user's question.\n\
You can invoke functions by writing a \"<{d}function_calls>\" block like the following as part of your reply to the user:\n\
<{d}function_calls>\n\
<{d}invoke name=\"$FUNCTION_NAME\">\n\
<{d}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{d}parameter>\n\
...\n\
</{d}invoke>\n\
<{d}invoke name=\"$FUNCTION_NAME2\">\n\
...\n\
</{d}invoke>\n\
</{d}function_calls>\n\
\n\
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The \"string\" attribute should be set to \"true\" for string type parameters and \"false\" for other types (numbers, booleans, arrays, objects).\n\
\n\
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:\n\
\n\
<{d}function_calls>\n\
...\n\
</{d}function_calls>\n\
\n\
<function_results>\n\
...\n\
</function_results>\n\
\n\
{think_start}...thinking about results{think_end}\n\
\n\
Here are the functions available in JSONSchema format:\n\
<functions>\n\
{}\n\
</functions>\n",
        schemas.join("\n")
    )
}

/// One tool call as the model writes it: a name and the arguments JSON object (as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsmlCall<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

/// Renders an assistant's tool calls: `\n\n<｜DSML｜function_calls>\n…\n</｜DSML｜function_calls>`,
/// one `invoke` per call, one `parameter` per top-level argument (strings raw with
/// `string="true"`, anything else as JSON with `string="false"`). `index` is the message's index
/// (for errors).
pub fn render_tool_calls(index: usize, calls: &[DsmlCall<'_>]) -> Result<String, TextError> {
    let d = DSML;
    let mut invokes = Vec::with_capacity(calls.len());
    for call in calls {
        let bad = |reason: String| TextError::ToolCallArguments {
            index,
            name: call.name.to_string(),
            reason,
        };
        let entries = match serde_json::from_str::<OrderedJson>(call.arguments) {
            Ok(OrderedJson::Object(entries)) => entries,
            Ok(_) => return Err(bad("not a JSON object".to_string())),
            Err(e) => return Err(bad(format!("not JSON: {e}"))),
        };
        let params: Vec<String> = entries
            .iter()
            .map(|(key, value)| {
                let (is_str, text) = match value {
                    OrderedJson::String(s) => ("true", s.clone()),
                    other => ("false", other.to_python_string()),
                };
                format!("<{d}parameter name=\"{key}\" string=\"{is_str}\">{text}</{d}parameter>")
            })
            .collect();
        invokes.push(format!(
            "<{d}invoke name=\"{}\">\n{}\n</{d}invoke>",
            call.name,
            params.join("\n")
        ));
    }
    Ok(format!("\n\n<{d}function_calls>\n{}\n</{d}function_calls>", invokes.join("\n")))
}

/// A tool call parsed from generated text; `arguments` is a JSON object text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// Where tool calls start in generated text (content ends here).
pub fn tool_calls_start() -> String {
    format!("\n\n<{DSML}function_calls")
}

fn malformed(reason: impl Into<String>) -> TextError {
    TextError::MalformedToolCall { reason: reason.into() }
}

fn expect<'a>(text: &'a str, prefix: &str, what: &str) -> Result<&'a str, TextError> {
    text.strip_prefix(prefix).ok_or_else(|| {
        let seen: String = text.chars().take(40).collect();
        malformed(format!("expected {what} {prefix:?}, found {seen:?}"))
    })
}

/// Parses the block that starts at [`tool_calls_start`] (`text` begins right after it) up to and
/// including `</｜DSML｜function_calls>`; returns the calls and the text after the block.
/// Arguments are rebuilt as a JSON object: `string="true"` values become JSON strings, others are
/// taken as the JSON they are.
pub fn parse_tool_calls(text: &str) -> Result<(Vec<ParsedCall>, &str), TextError> {
    let d = DSML;
    let end_block = format!("</{d}function_calls>");
    let invoke_open = format!("<{d}invoke name=\"");
    let param_open = format!("<{d}parameter name=\"");
    let param_close = format!("</{d}parameter>");
    let invoke_close = format!("</{d}invoke>");

    let mut rest = expect(text, ">\n", "block opening")?;
    let mut calls = Vec::new();
    loop {
        if let Some(after) = rest.strip_prefix(end_block.as_str()) {
            return Ok((calls, after));
        }
        rest = expect(rest, &invoke_open, "invoke or end of block")?;
        let quote = rest.find('"').ok_or_else(|| malformed("unterminated invoke name"))?;
        let name = rest[..quote].to_string();
        rest = expect(&rest[quote..], "\">\n", "end of invoke tag")?;
        let mut args: Vec<String> = Vec::new();
        let mut keys: Vec<&str> = Vec::new();
        while let Some(after) = rest.strip_prefix(param_open.as_str()) {
            let quote = after.find('"').ok_or_else(|| malformed("unterminated parameter name"))?;
            let key = &after[..quote];
            let after = expect(&after[quote..], "\" string=\"", "string attribute")?;
            let (is_str, after) = if let Some(a) = after.strip_prefix("true\">") {
                (true, a)
            } else if let Some(a) = after.strip_prefix("false\">") {
                (false, a)
            } else {
                return Err(malformed(format!("parameter {key:?}: string must be true or false")));
            };
            let close = after
                .find(param_close.as_str())
                .ok_or_else(|| malformed(format!("parameter {key:?} is not closed")))?;
            let value = &after[..close];
            if keys.contains(&key) {
                return Err(malformed(format!("duplicate parameter {key:?} in {name:?}")));
            }
            keys.push(key);
            let json_value = if is_str {
                py_string(value)
            } else {
                serde_json::from_str::<OrderedJson>(value).map_err(|e| {
                    malformed(format!("parameter {key:?} of {name:?} is not JSON: {e}"))
                })?;
                value.to_string()
            };
            args.push(format!("{}: {json_value}", py_string(key)));
            rest = expect(&after[close + param_close.len()..], "\n", "newline after parameter")?;
        }
        if args.is_empty() {
            // A call without arguments is rendered with an empty line inside the invoke.
            rest = rest.strip_prefix('\n').unwrap_or(rest);
        }
        rest = expect(rest, &invoke_close, "end of invoke")?;
        rest = expect(rest, "\n", "newline after invoke")?;
        calls.push(ParsedCall { name, arguments: format!("{{{}}}", args.join(", ")) });
    }
}
