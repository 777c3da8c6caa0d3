//! The one place where coordinator errors become gRPC statuses — and, for the OpenAI-compatible
//! HTTP API (`crate::http`), HTTP statuses with OpenAI error types.
//!
//! Every handler returns `Result<_, EngineError>` internally and converts here, so the mapping
//! (and the wording clients see) is defined once. Messages never contain prompt data.

use crate::engine::EngineError;
use tonic::Status;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::InvalidArgument { .. } => Status::invalid_argument(msg),
            EngineError::QueueFull { .. } => Status::resource_exhausted(msg),
            EngineError::Unavailable(_) => Status::unavailable(msg),
            EngineError::DeadlineExceeded { .. } => Status::deadline_exceeded(msg),
            EngineError::Internal(_) => Status::internal(msg),
        }
    }
}

/// How the HTTP API reports an [`EngineError`]: the status code, OpenAI's error `type` and our
/// `code`, mirroring the gRPC mapping above (INVALID_ARGUMENT → 400, RESOURCE_EXHAUSTED → 429,
/// UNAVAILABLE → 503, DEADLINE_EXCEEDED → 504, INTERNAL → 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpErrorKind {
    pub status: u16,
    pub error_type: &'static str,
    pub code: &'static str,
}

impl EngineError {
    /// This error's HTTP status and OpenAI error type.
    pub fn http_kind(&self) -> HttpErrorKind {
        let (status, error_type, code) = match self {
            EngineError::InvalidArgument { .. } => (400, "invalid_request_error", "invalid_value"),
            EngineError::QueueFull { .. } => (429, "rate_limit_error", "queue_full"),
            EngineError::Unavailable(_) => (503, "server_error", "unavailable"),
            EngineError::DeadlineExceeded { .. } => (504, "server_error", "deadline_exceeded"),
            EngineError::Internal(_) => (500, "server_error", "internal_error"),
        };
        HttpErrorKind { status, error_type, code }
    }

    /// The request field an error is about (OpenAI's `param`), when there is one.
    pub fn param(&self) -> Option<&'static str> {
        match self {
            EngineError::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Shorthand for a validation error.
pub fn invalid(field: &'static str, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument { field, reason: reason.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_error_has_its_code_and_message() {
        let cases = [
            (invalid("top_p", "1.5 is outside (0, 1]"), Code::InvalidArgument, "top_p"),
            (EngineError::QueueFull { depth: 3 }, Code::ResourceExhausted, "queue is full"),
            (EngineError::Unavailable("epoch 2 failed".into()), Code::Unavailable, "epoch 2"),
            (EngineError::DeadlineExceeded { generated: 4 }, Code::DeadlineExceeded, "deadline"),
            (EngineError::Internal("x".into()), Code::Internal, "internal"),
        ];
        for (e, code, text) in cases {
            let s = Status::from(e);
            assert_eq!(s.code(), code);
            assert!(s.message().contains(text), "{}", s.message());
        }
    }

    #[test]
    fn each_error_has_its_http_status() {
        let cases = [
            (invalid("top_p", "x"), 400, Some("top_p")),
            (EngineError::QueueFull { depth: 3 }, 429, None),
            (EngineError::Unavailable("x".into()), 503, None),
            (EngineError::DeadlineExceeded { generated: 4 }, 504, None),
            (EngineError::Internal("x".into()), 500, None),
        ];
        for (e, status, param) in cases {
            assert_eq!(e.http_kind().status, status, "{e}");
            assert_eq!(e.param(), param);
        }
    }
}
