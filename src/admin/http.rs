//! The admin endpoint's HTTP side (axum on hyper, HTTP/1.1).
//!
//! - `listen` (loopback): plain HTTP, no login; anyone on the box may read it.
//! - `tls_listen`: HTTPS only, and every request must log in (HTTP Basic) as a relay user of
//!   the group `admins`. No login: 401. A wrong user name or password: 401, counted and
//!   logged. A user outside the group: 403, counted and logged. Password checks run on the
//!   blocking pool, two at a time.
//!
//! Routes: `/` (the page), `/app.js`, `/app.css`, `/events` (the page's server-sent events),
//! `/status` (JSON), `/metrics` (Prometheus text). Every answer forbids framing, sniffing and
//! caching, and the page may load nothing from anywhere but the box itself.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{live, metrics, page, Sources};
use crate::config::ADMIN_GROUP;
use crate::gate::tls::Tls;

/// Pages open at once (each holds an event stream).
const STREAMS: usize = 32;
/// Password checks at once.
const CHECKS: usize = 2;
/// TLS handshakes under way at once, and how long one may take.
const HANDSHAKES: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const SECURITY_HEADERS: [(&str, &str); 5] = [
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

struct Endpoint {
    sources: Arc<Sources>,
    shutdown: CancellationToken,
    streams: Arc<Semaphore>,
    checks: Semaphore,
}

/// Serves plain HTTP on a loopback listener until `shutdown`.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>, shutdown: CancellationToken) {
    let app = routes(endpoint(sources, shutdown.clone()), false);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "the admin endpoint stopped");
    }
}

/// Serves HTTPS with logins on `tls_listen` until `shutdown`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<Tls>,
    sources: Arc<Sources>,
    shutdown: CancellationToken,
) {
    let app = routes(endpoint(sources, shutdown.clone()), true);
    let listener = TlsListener::start(listener, tls, shutdown.clone());
    let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    if let Err(error) = served {
        tracing::warn!(%error, "the admin endpoint (TLS) stopped");
    }
}

fn endpoint(sources: Arc<Sources>, shutdown: CancellationToken) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        sources,
        shutdown,
        streams: Arc::new(Semaphore::new(STREAMS)),
        checks: Semaphore::new(CHECKS),
    })
}

fn routes(endpoint: Arc<Endpoint>, login: bool) -> axum::Router {
    let router = axum::Router::new()
        .route(
            "/",
            get(|| async { asset(page::INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(page::SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { asset(page::STYLE, "text/css; charset=utf-8") }),
        )
        .route("/events", get(events))
        .route("/status", get(status))
        .route("/metrics", get(prometheus))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not here: try /, /status or /metrics\n",
            )
        });
    let router = if login {
        router.layer(axum::middleware::from_fn_with_state(
            endpoint.clone(),
            require_admin,
        ))
    } else {
        router
    };
    router
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(endpoint)
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn status(State(e): State<Arc<Endpoint>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(&e.sources.snapshot()).unwrap_or_default(),
    )
        .into_response()
}

async fn prometheus(State(e): State<Arc<Endpoint>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics(&e.sources.snapshot()),
    )
        .into_response()
}

async fn events(State(e): State<Arc<Endpoint>>) -> Response {
    let Ok(permit) = e.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many pages open at once; close one\n",
        )
            .into_response();
    };
    let stream = live::stream(e.sources.clone(), e.shutdown.clone(), permit);
    axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Lets a request through only with the login of a user of the group `admins`.
async fn require_admin(
    State(e): State<Arc<Endpoint>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let Some((user, password)) = basic_login(request.headers()) else {
        return unauthorized("log in as a relay user of the group `admins`\n");
    };
    let login = {
        let _turn = e.checks.acquire().await;
        e.sources.gate.login(&user, &password, ADMIN_GROUP).await
    };
    let logins = &e.sources.logins;
    match login {
        Some(true) => {
            logins.accepted.fetch_add(1, Ordering::Relaxed);
            next.run(request).await
        }
        Some(false) => {
            logins.not_admin.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, user, "admin login refused: the user is not in the group `admins`");
            (
                StatusCode::FORBIDDEN,
                "this user is not in the group `admins`\n",
            )
                .into_response()
        }
        None => {
            logins.bad_credentials.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, user, "admin login refused: wrong user name or password");
            unauthorized("wrong user name or password\n")
        }
    }
}

fn unauthorized(body: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"relaybox\", charset=\"UTF-8\"",
        )],
        body,
    )
        .into_response()
}

/// The user name and password of an `Authorization: Basic` header.
fn basic_login(headers: &HeaderMap) -> Option<(String, String)> {
    use base64::Engine as _;
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The address a TLS connection comes from.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

/// Accepts TCP connections and hands on those whose TLS handshake succeeds; handshakes run
/// side by side (a slow one holds up no other), each within a deadline.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(listener: TcpListener, tls: Arc<Tls>, shutdown: CancellationToken) -> TlsListener {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, ready) = mpsc::channel(HANDSHAKES);
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(HANDSHAKES));
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    a = listener.accept() => a,
                };
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::debug!(%error, "admin endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    continue;
                };
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let shaken =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                    match shaken {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "admin endpoint: TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "admin endpoint: TLS handshake too slow"),
                    }
                    drop(slot);
                });
            }
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The acceptor stopped (shutdown): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_logins_are_read_and_anything_else_is_none() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_login(&h), None);
        // "ops:pa:ss" (a password may hold colons).
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic b3BzOnBhOnNz"),
        );
        assert_eq!(
            basic_login(&h),
            Some(("ops".to_owned(), "pa:ss".to_owned()))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer b3BzOnBhOnNz"),
        );
        assert_eq!(basic_login(&h), None);
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_login(&h), None);
    }
}
