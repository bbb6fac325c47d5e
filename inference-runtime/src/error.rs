use axum::http::StatusCode;

/// Everything that can go wrong serving a request or loading a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading model from {dir}: {reason}")]
    LoadModel { dir: String, reason: String },
    #[error("model inference failed")]
    Inference(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("no route for {0}")]
    NoRoute(String),
    #[error("model `{0}` is not served here")]
    UnknownModel(String),
    #[error("model `{model}` does not support {op}")]
    Unsupported { model: String, op: &'static str },
    #[error("invalid request: {0}")]
    BadRequest(String),
    #[error("input too large: {0}")]
    InputTooLarge(String),
    #[error("tenant `{tenant}` over its limit: {reason}")]
    OverLimit { tenant: String, reason: String },
    #[error("request queue is full")]
    QueueFull,
    #[error("server is draining")]
    Draining,
    #[error("model `{0}` is not ready")]
    NotReady(String),
    /// Loading the model would exceed the process's memory budget.
    #[error("{0}")]
    OverBudget(String),
    /// A repository operation that conflicts with the model's state (loading twice, ...).
    #[error("{0}")]
    Conflict(String),
    #[error("model control is disabled: start the runtime with --model-control explicit to load and unload models")]
    ControlDisabled,
    #[error("worker stopped")]
    WorkerGone,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short stable label for metrics and the `type` field of error bodies.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::LoadModel { .. } => "load_model",
            Error::Inference(_) => "inference",
            Error::Tokenize(_) => "tokenize",
            Error::NoRoute(_) => "no_route",
            Error::UnknownModel(_) => "unknown_model",
            Error::Unsupported { .. } => "unsupported",
            Error::BadRequest(_) => "bad_request",
            Error::InputTooLarge(_) => "input_too_large",
            Error::OverLimit { .. } => "over_limit",
            Error::QueueFull => "queue_full",
            Error::Draining => "draining",
            Error::NotReady(_) => "not_ready",
            Error::OverBudget(_) => "over_budget",
            Error::Conflict(_) => "conflict",
            Error::ControlDisabled => "control_disabled",
            Error::WorkerGone => "worker_gone",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::UnknownModel(_) | Error::NoRoute(_) => StatusCode::NOT_FOUND,
            Error::Unsupported { .. } | Error::BadRequest(_) | Error::Tokenize(_) => StatusCode::BAD_REQUEST,
            Error::InputTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::OverLimit { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::QueueFull | Error::Draining | Error::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::OverBudget(_) | Error::Conflict(_) => StatusCode::CONFLICT,
            Error::ControlDisabled => StatusCode::FORBIDDEN,
            Error::LoadModel { .. } | Error::Inference(_) | Error::WorkerGone => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message shown to clients. Internal failures keep their detail in the logs.
    pub fn public_message(&self) -> String {
        match self {
            Error::Inference(_) | Error::WorkerGone | Error::LoadModel { .. } => "internal error".to_string(),
            other => other.to_string(),
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Inference(Box::new(e))
    }
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Inference(Box::new(e))
    }
}
