//! `--api-key`: every protected request must carry the key, as `Authorization: Bearer KEY`
//! (OpenAI's clients) or `x-api-key: KEY` (Anthropic's).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::errors::ApiError;

/// The key clients must present, kept as its SHA-256 digest: comparing digests of equal
/// length in constant time reveals neither the key's bytes nor its length.
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    pub fn new(key: &str) -> ApiKey {
        ApiKey { digest: sha256(key.as_bytes()) }
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        self.digest.ct_eq(&sha256(presented)).into()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What a request presents: the Bearer token or the `x-api-key` value, if any.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        // The scheme is case-insensitive (RFC 9110); the token follows one space.
        return match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => Some(v[7..].trim_ascii()),
            _ => Some(b""),
        };
    }
    headers.get("x-api-key").map(|v| v.as_bytes().trim_ascii())
}

/// Middleware: 401 in OpenAI's error shape, with `WWW-Authenticate`, unless the request
/// carries the key.
pub async fn require_key(State(key): State<Arc<ApiKey>>, req: Request, next: Next) -> Response {
    let why = match presented(req.headers()) {
        Some(k) if key.accepts(k) => return next.run(req).await,
        Some(_) => "the API key is wrong",
        None => "this server needs an API key: send `Authorization: Bearer KEY`",
    };
    tracing::warn!(path = %req.uri().path(), "refused a request: {why}");
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: why.to_owned(),
        kind: "invalid_request_error",
        param: None,
        code: Some("invalid_api_key"),
        retry_after: None,
    }
    .into_response();
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_are_read_from_either_header_and_compared_whole() {
        let key = ApiKey::new("s3cret");
        let check = |pairs: &[(&'static str, &str)]| presented(&headers(pairs)).is_some_and(|k| key.accepts(k));
        assert!(check(&[("authorization", "Bearer s3cret")]));
        assert!(check(&[("authorization", "bearer  s3cret ")]));
        assert!(check(&[("x-api-key", "s3cret")]));
        assert!(!check(&[("authorization", "Bearer s3cre")]));
        assert!(!check(&[("authorization", "Bearer s3crett")]));
        assert!(!check(&[("authorization", "Basic s3cret")]));
        assert!(!check(&[("authorization", "s3cret")]));
        assert!(!check(&[("x-api-key", "")]));
        assert!(!check(&[]));
        // A wrong Authorization header is not rescued by a right x-api-key.
        assert!(!check(&[("authorization", "Bearer nope"), ("x-api-key", "s3cret")]));
        assert_eq!(presented(&headers(&[])), None);
    }
}
