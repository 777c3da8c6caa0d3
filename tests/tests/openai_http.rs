//! The OpenAI-compatible HTTP API through real processes on loopback.
//!
//! - The official `openai` Python client (pinned, pip-installed into a venv under
//!   `~/.cache/fathom/openai-venv` by this test when missing) talks to a real `fathom up`
//!   cluster: models, completion (with and without a stop string), chat with logprobs, streamed
//!   chat with usage, streamed thinking-mode chat; every output equals the gRPC path's greedy
//!   output for the same prompt (the chat prompts are written out here by hand in the
//!   DeepSeek-V3.2 format, not rendered by the code under test).
//! - Bad requests get 400s in OpenAI's error shape naming the field; an unknown model gets 404;
//!   a raw SSE stream ends with `data: [DONE]`; a full queue answers 429 and a coordinator that
//!   is not serving 503.
//!
//! Python 3 with `venv` and pip access to PyPI are required: without them the test FAILS saying
//! what is missing (`scripts/deps.sh` installs python3-venv on Debian).

mod cluster_support;

use cluster_support::{Cluster, Opts, fathom_bin, port, tiny_model};
use fathom_proto::v1::inference_client::InferenceClient;
use fathom_proto::v1::{
    FinishReason, GenerateRequest, SamplingParams, TokenIds, generate_request, generate_response,
};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `openai` package version the test installs.
const OPENAI_VERSION: &str = "3.57.0";
const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";

// ---------------------------------------------------------------------------------------------
// Python with the openai client.

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python with `openai==OPENAI_VERSION`, created on first use.
fn openai_python() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME must be set to locate ~/.cache/fathom");
    let venv = PathBuf::from(home).join(".cache/fathom/openai-venv");
    let python = venv.join("bin/python");
    let has_client = |py: &PathBuf| {
        Command::new(py)
            .args([
                "-c",
                &format!("import openai; assert openai.__version__ == '{OPENAI_VERSION}'"),
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_client(&python) {
        return python;
    }
    let venv_ok = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        venv_ok,
        "FAIL: this test needs python3 with the venv module (Debian: apt-get install \
         python3-venv; scripts/deps.sh does it)"
    );
    if !python.exists() {
        run_ok(Command::new("python3").arg("-m").arg("venv").arg(&venv), "python3 -m venv");
    }
    run_ok(
        Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            &format!("openai=={OPENAI_VERSION}"),
        ]),
        "pip install openai (needs PyPI)",
    );
    assert!(has_client(&python), "openai {OPENAI_VERSION} not importable after pip install");
    python
}

// ---------------------------------------------------------------------------------------------
// `fathom up` as a child process.

/// A running `fathom up`; SIGTERM (so it stops its own workers) and reaped on drop.
struct Up {
    child: Child,
    grpc: String,
    http: String,
    _cache: tempfile::TempDir,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fathom_up() -> Up {
    let cache = tempfile::Builder::new().prefix("fathom-up-cache-").tempdir().unwrap();
    let mut child = Command::new(fathom_bin())
        .arg("up")
        .arg("--model")
        .arg(tiny_model())
        .arg("--cache-dir")
        .arg(cache.path())
        .args(["--kv-blocks", "256", "--kv-block-size", "16"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning fathom up");
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    let mut up = Up { child, grpc: String::new(), http: String::new(), _cache: cache };
    let deadline = Instant::now() + Duration::from_secs(90);
    while up.http.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("fathom up printed its addresses within 90 s");
        if let Some(a) = line.strip_prefix("fathom: serving on ") {
            up.grpc = a.to_string();
        } else if let Some(u) = line.strip_prefix("fathom: http on ") {
            assert!(!up.grpc.is_empty(), "the gRPC line comes first");
            up.http = u.to_string();
        }
    }
    assert!(up.http.starts_with("http://127.0.0.1:") && up.http.ends_with("/v1"), "{}", up.http);
    up
}

// ---------------------------------------------------------------------------------------------
// The gRPC path's answer.

#[derive(Debug)]
struct Grpc {
    /// Concatenated `text_delta`s, the EOS text that ended generation removed.
    text: String,
    finish: &'static str,
    prompt_tokens: u32,
    completion_tokens: u32,
}

async fn grpc_greedy(addr: &str, input: generate_request::Input, max_tokens: u32) -> Grpc {
    let mut client = InferenceClient::connect(format!("http://{addr}")).await.unwrap();
    let req = GenerateRequest {
        input: Some(input),
        sampling: Some(SamplingParams { max_tokens, ..Default::default() }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let mut text = String::new();
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.kind {
            Some(generate_response::Kind::Chunk(c)) => text.push_str(&c.text_delta),
            Some(generate_response::Kind::Final(f)) => {
                let stop = f.finish_reason == FinishReason::Stop as i32;
                if stop {
                    text =
                        text.strip_suffix(EOS).expect("the EOS text ends a stopped output").into();
                }
                let u = f.usage.unwrap();
                return Grpc {
                    text,
                    finish: if stop { "stop" } else { "length" },
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                };
            }
            None => {}
        }
    }
    panic!("gRPC stream ended without a final message");
}

fn text(s: &str) -> generate_request::Input {
    generate_request::Input::Text(s.to_string())
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_matches_grpc_greedy() {
    let python = openai_python();
    let up = fathom_up();
    let n = 24;
    let prompt = "The capital of France is";
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hello."},
    ]);
    let chat_prompt = |open: &str| format!("{BOS}You are terse.{USER}Say hello.{ASSISTANT}{open}");
    let completion = grpc_greedy(&up.grpc, text(prompt), n).await;
    let chat = grpc_greedy(&up.grpc, text(&chat_prompt("</think>")), n).await;
    let thinking = grpc_greedy(&up.grpc, text(&chat_prompt("<think>")), n).await;
    let chars: Vec<char> = completion.text.chars().collect();
    assert!(chars.len() >= 6, "greedy completion too short for a stop test: {completion:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = &completion.text[..completion.text.find(&stop).unwrap()];

    let plan = json!({
        "base_url": up.http, "max_tokens": n, "prompt": prompt, "messages": messages,
        "stop": stop,
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/openai/client_check.py");
    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the openai client script");
    child.stdin.take().unwrap().write_all(plan.to_string().as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "client_check.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("client_check.py prints JSON");

    let model = tiny_model().file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(got["models"], json!([model]));
    let usage = |g: &Grpc| {
        json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
               "total_tokens": g.prompt_tokens + g.completion_tokens})
    };

    let c = &got["completion"];
    assert_eq!(c["text"], completion.text, "completion text");
    assert_eq!(c["finish_reason"], completion.finish);
    assert_eq!(c["usage"], usage(&completion));

    let s = &got["completion_stop"];
    assert_eq!(s["text"], cut, "completion cut before the stop string {stop:?}");
    assert_eq!(s["finish_reason"], "stop");

    let ch = &got["chat"];
    assert_eq!(ch["content"], chat.text, "chat content");
    assert_eq!(ch["finish_reason"], chat.finish);
    assert_eq!(ch["usage"], usage(&chat));
    assert_eq!(ch["logprob_tokens"], chat.completion_tokens);
    assert_eq!(ch["top_logprobs"], json!(vec![2; chat.completion_tokens as usize]));

    let st = &got["stream_chat"];
    assert_eq!(st["content"], chat.text, "streamed chat content");
    assert_eq!(st["reasoning"], "");
    assert_eq!(st["roles"], json!(["assistant"]));
    assert_eq!(st["finish_reason"], chat.finish);
    assert_eq!(st["usage"], usage(&chat));
    if !chat.text.is_empty() {
        assert!(st["content_pieces"].as_u64().unwrap() >= 1);
    }

    let th = &got["stream_thinking"];
    let (reasoning, content) = match thinking.text.split_once("</think>") {
        Some((r, c)) => (r.to_string(), c.to_string()),
        None => (thinking.text.clone(), String::new()),
    };
    assert_eq!(th["reasoning"], reasoning, "thinking: reasoning_content");
    assert_eq!(th["content"], content, "thinking: content");
    assert_eq!(th["finish_reason"], thinking.finish);
}

// ---------------------------------------------------------------------------------------------
// A plain HTTP/1.1 client (one request per connection).

struct HttpResponse {
    status: u16,
    content_type: String,
    body: String,
}

impl HttpResponse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut payload = raw[split + 4..].to_vec();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    if header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        payload = dechunk(&payload);
    }
    HttpResponse {
        status,
        content_type: header("content-type"),
        body: String::from_utf8(payload).unwrap(),
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16)
            .expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Asserts an OpenAI-shaped error with `status` and `param`.
fn assert_error(r: &HttpResponse, status: u16, param: Option<&str>, what: &str) -> Value {
    assert_eq!(r.status, status, "{what}: {}", r.body);
    assert!(r.content_type.starts_with("application/json"), "{what}: {}", r.content_type);
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(e.get("code").is_some() && e.get("param").is_some(), "{what}: {v}");
    assert_eq!(e["param"], param.map_or(Value::Null, |p| json!(p)), "{what}: {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors() {
    let http_addr = format!("127.0.0.1:{}", port());
    let c = Cluster::start(Opts {
        extra: vec!["--http".into(), http_addr.clone()],
        ..Default::default()
    })
    .expect("cluster");
    let a = http_addr.as_str();
    let model = c.model.file_name().unwrap().to_string_lossy().into_owned();
    let post = |path: &str, v: Value| http(a, "POST", path, v.to_string().as_bytes());
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);

    let h = http(a, "GET", "/health", b"");
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("serving")));
    let m = http(a, "GET", "/v1/models", b"").json();
    assert_eq!(m["data"][0]["id"], model);

    let r = post(chat, json!({"model": model}));
    let e = assert_error(&r, 400, Some("messages"), "missing messages");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    let r = post(chat, json!({"messages": [{"role": "wizard", "content": "hi"}]}));
    let e = assert_error(&r, 400, Some("messages"), "unknown role");
    assert!(e["error"]["message"].as_str().unwrap().contains("wizard"), "{e}");
    for bad in [0, -3] {
        let r = post(chat, json!({"messages": user, "max_tokens": bad}));
        assert_error(&r, 400, Some("max_tokens"), "max_tokens <= 0");
    }
    let r = post("/v1/completions", json!({"prompt": "x", "max_tokens": 0}));
    assert_error(&r, 400, Some("max_tokens"), "completions max_tokens = 0");
    let r = post(chat, json!({"messages": user, "temperature": -0.5}));
    assert_error(&r, 400, Some("temperature"), "temperature < 0");
    let r = http(a, "POST", chat, b"{\"messages\": [");
    assert_error(&r, 400, Some("body"), "malformed JSON");
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat((8 << 20) + 1));
    let r = http(a, "POST", "/v1/completions", big.as_bytes());
    assert_error(&r, 400, Some("body"), "oversize body");
    let r = post(chat, json!({"model": "gpt-4o", "messages": user}));
    let e = assert_error(&r, 404, Some("model"), "unknown model");
    assert_eq!(e["error"]["code"], "model_not_found");
    let r = post(chat, json!({"messages": user, "n": 2}));
    assert_error(&r, 400, Some("n"), "n = 2");
    let r = post(chat, json!({"messages": user, "stop": ["ok", ""]}));
    assert_error(&r, 400, Some("stop"), "empty stop string");
    let r = post("/v1/completions", json!({"max_tokens": 3}));
    assert_error(&r, 400, Some("prompt"), "missing prompt");
    let r = post(chat, json!({"messages": user, "top_logprobs": 3}));
    assert_error(&r, 400, Some("top_logprobs"), "top_logprobs without logprobs");
    let r = post(chat, json!({"messages": [{"role": "assistant", "content": "x"}]}));
    assert_error(&r, 400, Some("messages"), "ends with an assistant message");
    assert_error(&http(a, "GET", "/v1/nothing", b""), 404, None, "unknown route");
    assert_error(&http(a, "GET", "/v1/completions", b""), 405, None, "wrong method");

    // Token-id prompts and raw SSE: the stream equals the gRPC greedy output and ends [DONE].
    let ids = vec![5u32, 17, 42, 7];
    let want =
        grpc_greedy(&c.addr, generate_request::Input::TokenIds(TokenIds { ids: ids.clone() }), 8)
            .await;
    let r = post(
        "/v1/completions",
        json!({"model": model, "prompt": ids, "max_tokens": 8, "temperature": 0, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.content_type.starts_with("text/event-stream"), "{}", r.content_type);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{:?}", r.body);
    let mut streamed = String::new();
    let mut finish = Value::Null;
    for event in r.body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").expect("SSE data line");
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["object"], "text_completion");
        streamed.push_str(v["choices"][0]["text"].as_str().unwrap());
        if !v["choices"][0]["finish_reason"].is_null() {
            finish = v["choices"][0]["finish_reason"].clone();
        }
    }
    assert_eq!(streamed, want.text);
    assert_eq!(finish, want.finish);
}

#[test]
fn a_full_queue_answers_429() {
    // `--max-queue 0`: every request finds the admission queue full.
    let http_addr = format!("127.0.0.1:{}", port());
    let _c = Cluster::start(Opts {
        extra: vec!["--http".into(), http_addr.clone(), "--max-queue".into(), "0".into()],
        ..Default::default()
    })
    .expect("cluster");
    let body = json!({"prompt": "hi", "max_tokens": 2});
    let r = http(&http_addr, "POST", "/v1/completions", body.to_string().as_bytes());
    let e = assert_error(&r, 429, None, "queue full");
    assert_eq!(e["error"]["code"], "queue_full");
}

#[test]
fn a_coordinator_that_is_not_serving_answers_503() {
    // One static worker that never comes up: the coordinator waits for workers forever.
    let http_addr = format!("127.0.0.1:{}", port());
    let nobody = format!("w0=127.0.0.1:{}", port());
    let _coordinator = KillOnDrop(
        Command::new(fathom_bin())
            .arg("coordinator")
            .arg("--model")
            .arg(tiny_model())
            .args(["--listen", &format!("127.0.0.1:{}", port()), "--http", &http_addr])
            .args(["--static-worker", &nobody])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning fathom coordinator"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(&http_addr).is_err() {
        assert!(Instant::now() < deadline, "the HTTP API did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let h = http(&http_addr, "GET", "/health", b"");
    assert_eq!((h.status, h.json()["status"].clone()), (503, json!("waiting_for_workers")));
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let r = http(&http_addr, "POST", "/v1/chat/completions", body.to_string().as_bytes());
    let e = assert_error(&r, 503, None, "not serving");
    assert_eq!(e["error"]["type"], "server_error");
}

/// A child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
