//! Kubernetes API errors as one clear sentence, for pod events, logs and HTTP bodies.
//!
//! kube's own `Display` of an API error appends the whole `Status` in Rust debug form; users
//! must never see that. [`kube_error`] keeps the API server's message and its HTTP code and
//! reason, and nothing else.

/// The HTTP code of an answer the API server gave, when the error is one.
pub fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether the API server answered 409 Conflict (a stale `resourceVersion`, or an object that
/// exists already, such as a second Binding).
pub fn is_conflict(e: &kube::Error) -> bool {
    api_code(e) == Some(409)
}

/// Whether the API server answered 404 Not Found (the object is gone).
pub fn is_not_found(e: &kube::Error) -> bool {
    api_code(e) == Some(404)
}

/// `e` as one sentence: the API server's message with its HTTP code and reason
/// (`... the object has been modified; please apply your changes to the latest version and try
/// again (HTTP 409 Conflict)`), or, for errors before an answer, each cause's message in turn.
pub fn kube_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() { String::new() } else { format!(" {}", s.reason) };
            if s.message.is_empty() {
                format!("the API server answered HTTP {}{reason}", s.code)
            } else {
                format!("{} (HTTP {}{reason})", s.message.trim_end_matches('.'), s.code)
            }
        }
        other => {
            let mut msg = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(s) = src {
                let text = s.to_string();
                if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
                src = s.source();
            }
            msg
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn conflict() -> kube::Error {
        let s: Status = serde_json::from_value(serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 409, "reason": "Conflict",
            "message": "Operation cannot be fulfilled on gpunodes.tessera.dev \"gpu-node-a\": the object has been modified; please apply your changes to the latest version and try again",
            "details": {"name": "gpu-node-a", "group": "tessera.dev", "kind": "gpunodes"}
        }))
        .unwrap();
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn an_api_error_is_its_message_code_and_reason_without_a_debug_dump() {
        let e = conflict();
        let text = kube_error(&e);
        assert_eq!(
            text,
            "Operation cannot be fulfilled on gpunodes.tessera.dev \"gpu-node-a\": the object has been modified; \
             please apply your changes to the latest version and try again (HTTP 409 Conflict)"
        );
        for dump in ["Status {", "Some(", "code:", "details"] {
            assert!(!text.contains(dump), "{text}");
        }
        assert!(is_conflict(&e) && !is_not_found(&e));
    }

    #[test]
    fn an_empty_message_still_names_the_answer() {
        let s: Status = serde_json::from_value(serde_json::json!({"code": 404, "reason": "NotFound"})).unwrap();
        let e = kube::Error::Api(Box::new(s));
        assert_eq!(kube_error(&e), "the API server answered HTTP 404 NotFound");
        assert!(is_not_found(&e));
    }
}
