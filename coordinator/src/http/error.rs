//! Errors of the HTTP API in OpenAI's shape:
//! `{"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..." | null}}`.
//!
//! Engine and validation errors are converted with the single mapping of `api/status.rs`
//! ([`EngineError::http_kind`]); only errors that exist at the HTTP level alone (unknown model,
//! unknown route, wrong method) are built here. Messages never contain prompt data.

use crate::engine::EngineError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub error_type: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// 404 for a `model` other than the served one (OpenAI's `model_not_found`).
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        // The asked name is user input but not prompt data; cap it so the error stays small.
        let asked: String = asked.chars().take(100).collect();
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("the model {asked:?} does not exist; this server serves {served:?}"),
            error_type: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }
    }

    /// 404 for a path that is not part of the API.
    pub fn no_route(path: &str) -> Self {
        let path: String = path.chars().take(100).collect();
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no route {path}"),
            error_type: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// 405 for a known path with the wrong method.
    pub fn wrong_method() -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "method not allowed on this path".into(),
            error_type: "invalid_request_error",
            param: None,
            code: Some("method_not_allowed"),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> String {
        let body = Body {
            error: Inner {
                message: &self.message,
                error_type: self.error_type,
                param: self.param,
                code: self.code,
            },
        };
        serde_json::to_string(&body).expect("serializing an error")
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let kind = e.http_kind();
        Self {
            status: StatusCode::from_u16(kind.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: e.to_string(),
            error_type: kind.error_type,
            param: e.param(),
            code: Some(kind.code),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.to_json()).into_response();
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::invalid;

    #[test]
    fn engine_errors_keep_their_field_and_status() {
        let e = ApiError::from(invalid("temperature", "-1 must be finite and >= 0"));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("temperature"));
        let q = ApiError::from(EngineError::QueueFull { depth: 2 });
        assert_eq!(q.status, StatusCode::TOO_MANY_REQUESTS);
        let v: serde_json::Value = serde_json::from_str(&q.to_json()).unwrap();
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
        let m = ApiError::unknown_model("gpt-4", "tiny");
        assert_eq!(m.status, StatusCode::NOT_FOUND);
        assert_eq!(m.code, Some("model_not_found"));
    }
}
