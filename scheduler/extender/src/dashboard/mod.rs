//! The web GPU map served at `GET /`: one page, a stylesheet and a script, embedded in the
//! binary with no build step and no external assets.
//!
//! The script polls `GET /api/v1/cluster` and `GET /api/v1/pending` and asks
//! `GET /api/v1/explain/{ns}/{pod}` about the pending pod an operator clicks. It draws
//! nodes → GPUs → MIG instances at their real start positions over the GPU's memory slices.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

const INDEX_HTML: &str = include_str!("index.html");
const APP_CSS: &str = include_str!("app.css");
const APP_JS: &str = include_str!("app.js");

/// Everything the page loads comes from this server; nothing inline, nothing remote.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Asset {
    pub body: &'static str,
    pub content_type: &'static str,
}

/// The embedded file served at `path`, if any.
pub fn asset(path: &str) -> Option<Asset> {
    let (body, content_type) = match path {
        "/" | "/index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "/dashboard/app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "/dashboard/app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => return None,
    };
    Some(Asset { body, content_type })
}

impl Asset {
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut r = Response::new(Full::new(Bytes::from_static(self.body.as_bytes())));
        *r.status_mut() = StatusCode::OK;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(self.content_type));
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_references_is_served() {
        let page = asset("/").map(|a| a.body).unwrap_or_default();
        for path in ["/dashboard/app.css", "/dashboard/app.js"] {
            assert!(page.contains(&format!("\"{path}\"")), "index.html does not load {path}");
            assert!(asset(path).is_some_and(|a| !a.body.is_empty()), "{path} is not served");
        }
        assert!(!page.contains("http://") && !page.contains("https://"), "the page must load nothing remote");
    }
}
