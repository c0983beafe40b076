//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::{ErrorCode, StepError};
use crate::scheduler::Refused;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// 400 `invalid_request_error`, naming the offending parameter if there is one.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{model}` does not exist"),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    pub fn not_found(path: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no such endpoint: {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
            retry_after: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A request the scheduler would not take: 503 with `Retry-After` when its queue is
    /// full (clients such as OpenAI's retry after the pause), 503 when it has stopped.
    pub fn refused(e: Refused) -> Self {
        let code = match e {
            Refused::QueueFull { .. } => "queue_full",
            Refused::Stopped => "scheduler_stopped",
        };
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: e.to_string(),
            kind: "server_error",
            param: None,
            code: Some(code),
            retry_after: matches!(e, Refused::QueueFull { .. }).then_some(1),
        }
    }

    /// A request that failed while generating. Only a step the engine refused as sent
    /// is the client's doing (400); `code` names the class of the failure.
    pub fn generation_failed(e: StepError) -> Self {
        let (status, kind) = match e.code {
            ErrorCode::InvalidArgument => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        ApiError { status, message: e.message, kind, param: None, code: Some(e.code.as_str()), retry_after: None }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } })
    }
}

impl ApiError {
    /// The error's status and `Retry-After` with `body` (OpenAI's shape, or another API's).
    pub fn respond_with(&self, body: serde_json::Value) -> Response {
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond_with(self.body())
    }
}
