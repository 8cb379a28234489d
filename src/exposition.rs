//! `/metrics` over HTTP, for the coordinator and the agents, in the two text formats it speaks
//! (ARCHITECTURE.md, "Metrics and alerts").
//!
//! `prometheus_client` writes OpenMetrics 1.0, which Prometheus asks for first. Tools that ask
//! for nothing in particular (curl, `promtool check metrics`, older scrapers) get the classic
//! Prometheus text format 0.0.4, as the official client libraries negotiate it. The two differ
//! where a plain-text reader would misread OpenMetrics: a counter's family is named without
//! `_total` in OpenMetrics (`# TYPE standby_heartbeats counter`, sample
//! `standby_heartbeats_total`), so a 0.0.4 reader sees a sample with no HELP and no TYPE; `# UNIT`
//! and `# EOF` do not exist in 0.0.4; `info` and `stateset` are gauges there.

/// The content type of each format.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`).
/// OpenMetrics is served only to a client that names it with a quality above 0.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return false;
    };
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        media.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
    })
}

/// Serves `/metrics` on `listener` until `shutdown`: `encode` gives the OpenMetrics text, sent
/// as it is to a scraper that asks for OpenMetrics (Prometheus), in the 0.0.4 text format to
/// anyone else (`curl | promtool check metrics`).
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    encode: F,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move |headers: axum::http::HeaderMap| {
            let encode = encode.clone();
            async move {
                let accept = headers.get(ACCEPT).and_then(|v| v.to_str().ok());
                let text = encode();
                if wants_openmetrics(accept) {
                    ([(CONTENT_TYPE, OPENMETRICS)], text)
                } else {
                    ([(CONTENT_TYPE, TEXT_004)], to_text_004(&text))
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Rewrites an OpenMetrics exposition (as `prometheus_client` writes it: each family's HELP,
/// TYPE and optional UNIT line, then its samples, then `# EOF`) in the 0.0.4 text format.
pub fn to_text_004(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 256);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = lines
                .peek()
                .and_then(|t| t.strip_prefix("# TYPE "))
                .and_then(|t| t.split_once(' '))
                .filter(|(n, _)| *n == name)
                .map(|(_, k)| k.to_string());
            match kind {
                Some(kind) => {
                    lines.next();
                    let (name, kind) = family_004(name, &kind);
                    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
                }
                None => out.push_str(&format!("# HELP {name} {help}\n")),
            }
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            // Not part of 0.0.4; the unit is already the name's suffix.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A family's name and type in 0.0.4: its samples' names must start with the family name.
fn family_004(name: &str, kind: &str) -> (String, &'static str) {
    match kind {
        "counter" => (format!("{name}_total"), "counter"),
        "info" => (format!("{name}_info"), "gauge"),
        "gauge" | "stateset" => (name.to_string(), "gauge"),
        "histogram" | "gaugehistogram" => (name.to_string(), "histogram"),
        "summary" => (name.to_string(), "summary"),
        _ => (name.to_string(), "untyped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_curl_gets_text() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prom)));
        assert!(!wants_openmetrics(None));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn counters_carry_total_in_their_family_name_and_units_and_eof_go() {
        let om = "# HELP standby_heartbeats Heartbeats received.\n\
                  # TYPE standby_heartbeats counter\n\
                  standby_heartbeats_total 3\n\
                  # HELP standby_up_bytes Bytes.\n\
                  # TYPE standby_up_bytes counter\n\
                  # UNIT standby_up_bytes bytes\n\
                  standby_up_bytes_total{pair=\"p\"} 5\n\
                  # HELP standby_x Info.\n\
                  # TYPE standby_x info\n\
                  standby_x_info{version=\"1\"} 1\n\
                  # HELP standby_pairs Pairs.\n\
                  # TYPE standby_pairs gauge\n\
                  standby_pairs 2\n\
                  # EOF\n";
        let text = to_text_004(om);
        assert_eq!(
            text,
            "# HELP standby_heartbeats_total Heartbeats received.\n\
             # TYPE standby_heartbeats_total counter\n\
             standby_heartbeats_total 3\n\
             # HELP standby_up_bytes_total Bytes.\n\
             # TYPE standby_up_bytes_total counter\n\
             standby_up_bytes_total{pair=\"p\"} 5\n\
             # HELP standby_x_info Info.\n\
             # TYPE standby_x_info gauge\n\
             standby_x_info{version=\"1\"} 1\n\
             # HELP standby_pairs Pairs.\n\
             # TYPE standby_pairs gauge\n\
             standby_pairs 2\n"
        );
    }
}
