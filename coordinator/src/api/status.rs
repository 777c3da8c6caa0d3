//! The one place where coordinator errors become gRPC statuses.
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
}
