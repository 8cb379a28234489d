//! The coordinator's read-only status page (`--status-listen`, off by default): pairs, the last
//! failover's phases, machines and recent events, as HTML at `/` and as JSON at `/status.json`.
//!
//! Plain HTTP on an address the operator chooses: the page shows pair names, machine names and
//! addresses, so it belongs on loopback or a private network (ARCHITECTURE.md, "Status page").
//! It can change nothing: only GET, from the engine's views and its event window. The HTML has
//! no script at all and a Content-Security-Policy that forbids any (`default-src 'none'`), so a
//! name or message an agent sent cannot run in an operator's browser even if escaping failed.
//!
//! - `model`: what the page shows, built from the views and events (pure).
//! - `html`: the document, every outside text escaped.

mod html;
mod model;
#[cfg(test)]
mod tests;

pub use html::{escape, page};
pub use model::{EventLine, Failover, MachineStatus, PairStatus, Phase, Status};

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::control::engine::Engine;

/// Scripts, frames, forms, images, fonts, connections: none; the one inline style sheet only.
pub const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; \
                       form-action 'none'; frame-ancestors 'none'";

/// Serves the page until `shutdown`.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    engine: Engine,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let json_engine = engine.clone();
    let app = axum::Router::new()
        .route(
            "/",
            get(move || {
                let e = engine.clone();
                async move { respond(&e, Format::Html).await }
            }),
        )
        .route(
            "/status.json",
            get(move || {
                let e = json_engine.clone();
                async move { respond(&e, Format::Json).await }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[derive(Clone, Copy)]
enum Format {
    Html,
    Json,
}

/// The current status from the engine, in `format`; 503 when the engine does not answer (it is
/// stopping).
async fn respond(engine: &Engine, format: Format) -> Response {
    let views = match engine.list().await {
        Ok(v) => v,
        Err(e) => {
            return (StatusCode::SERVICE_UNAVAILABLE, e.message().to_string()).into_response();
        }
    };
    let events = engine.events.recent();
    let status = Status::build(views, &events, crate::host::unix_ms_now());
    let (body, kind) = match format {
        Format::Html => (page(&status), "text/html; charset=utf-8"),
        Format::Json => match serde_json::to_string_pretty(&status) {
            Ok(j) => (j, "application/json"),
            Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
    };
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}
