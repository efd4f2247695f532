//! Bookinfo productpage (port 9080): the front end users and ingress
//! gateways call. It calls details (3 s timeout, one try) and reviews (3 s
//! timeout, two tries) for every page, propagating `end-user` from the
//! signed-in session and the tracing headers, so routing on `end-user`,
//! fault injection and timeouts show in the page exactly as Istio's tasks
//! document.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderValue, COOKIE, REFERER, SET_COOKIE};
use http::{HeaderMap, Method, StatusCode};
use serde_json::{json, Value};

use super::http::{self as h, Handler, Req, Resp};
use super::{positional_port, SampleError};

const PORT: u16 = 9080;
const TIMEOUT: Duration = Duration::from_secs(3);
/// Tries of the reviews call (the original loops twice).
const REVIEWS_TRIES: usize = 2;
const SESSION_COOKIE: &str = "session";

pub(crate) const DETAILS_ERROR: &str =
    "Sorry, product details are currently unavailable for this book.";
pub(crate) const REVIEWS_ERROR: &str =
    "Sorry, product reviews are currently unavailable for this book.";
pub(crate) const RATINGS_ERROR: &str =
    "Sorry, product ratings are currently unavailable for this book.";

const TITLE: &str = "The Comedy of Errors";
const DESCRIPTION: &str = "<a href=\"https://en.wikipedia.org/wiki/The_Comedy_of_Errors\">Wikipedia Summary</a>: The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of his most farcical comedies, with a major part of the humour coming from slapstick and mistaken identity, in addition to puns and word play.";

/// Base URLs of productpage's callees, from the same variables as the
/// original (`SERVICES_DOMAIN`, `<SVC>_HOSTNAME`, `<SVC>_SERVICE_PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstreams {
    pub details: String,
    pub reviews: String,
    pub ratings: String,
}

impl Upstreams {
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Self {
        let domain = env("SERVICES_DOMAIN").map_or_else(String::new, |d| format!(".{d}"));
        let base = |svc: &str| {
            let upper = svc.to_ascii_uppercase();
            let host = env(&format!("{upper}_HOSTNAME")).unwrap_or_else(|| svc.to_string());
            let port = env(&format!("{upper}_SERVICE_PORT")).unwrap_or_else(|| PORT.to_string());
            format!("http://{host}{domain}:{port}")
        };
        Upstreams {
            details: base("details"),
            reviews: base("reviews"),
            ratings: base("ratings"),
        }
    }
}

struct ProductPage {
    upstreams: Upstreams,
}

/// The outcome of one callee: its status and JSON (or the error JSON the
/// original substitutes).
struct Called {
    status: StatusCode,
    body: Value,
}

impl Handler for ProductPage {
    async fn handle(&self, req: Req) -> Resp {
        let path = req.path().to_string();
        match (req.method.clone(), path.as_str()) {
            (Method::GET, "/") | (Method::GET, "/index.html") => h::html(index_page()),
            (Method::GET, "/health") => h::html("Product page is healthy"),
            (Method::POST, "/login") => login(&req),
            (Method::GET, "/logout") => logout(&req),
            (Method::GET, "/productpage") => self.product_page(&req).await,
            (Method::GET, "/api/v1/products") => h::json(
                StatusCode::OK,
                json!([{"id": 0, "title": TITLE, "descriptionHtml": DESCRIPTION}]).to_string(),
            ),
            (Method::GET, api) if api.starts_with("/api/v1/products/") => {
                self.api(&req, &api["/api/v1/products/".len()..]).await
            }
            _ => h::not_found(),
        }
    }
}

impl ProductPage {
    async fn api(&self, req: &Req, rest: &str) -> Resp {
        let (id, what) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(id) = id.parse::<i64>() else {
            return h::not_found();
        };
        let headers = forward_headers(req);
        let called = match what {
            "" => self.details(id, &headers).await,
            "reviews" => self.reviews(id, &headers).await,
            "ratings" => self.ratings(id, &headers).await,
            _ => return h::not_found(),
        };
        h::json(called.status, called.body.to_string())
    }

    async fn call(&self, url: &str, headers: &HeaderMap, tries: usize, error: &str) -> Called {
        let mut status = StatusCode::INTERNAL_SERVER_ERROR;
        for _ in 0..tries {
            match h::fetch(Method::GET, url, headers, Bytes::new(), TIMEOUT).await {
                Ok(resp) if resp.status == StatusCode::OK => {
                    if let Ok(body) = serde_json::from_slice::<Value>(&resp.body) {
                        return Called {
                            status: StatusCode::OK,
                            body,
                        };
                    }
                    tracing::warn!(url, "callee answered with invalid JSON");
                }
                Ok(resp) => {
                    tracing::warn!(url, status = %resp.status, "callee answered with an error");
                    status = resp.status;
                }
                Err(e) => {
                    tracing::warn!(url, error = %e, "call failed");
                    status = StatusCode::INTERNAL_SERVER_ERROR;
                }
            }
        }
        Called {
            status,
            body: json!({ "error": error }),
        }
    }

    async fn details(&self, id: i64, headers: &HeaderMap) -> Called {
        let url = format!("{}/details/{id}", self.upstreams.details);
        self.call(&url, headers, 1, DETAILS_ERROR).await
    }

    async fn reviews(&self, id: i64, headers: &HeaderMap) -> Called {
        let url = format!("{}/reviews/{id}", self.upstreams.reviews);
        self.call(&url, headers, REVIEWS_TRIES, REVIEWS_ERROR).await
    }

    async fn ratings(&self, id: i64, headers: &HeaderMap) -> Called {
        let url = format!("{}/ratings/{id}", self.upstreams.ratings);
        self.call(&url, headers, 1, RATINGS_ERROR).await
    }

    async fn product_page(&self, req: &Req) -> Resp {
        let headers = forward_headers(req);
        // One after the other, as the original: a slow details delays reviews.
        let details = self.details(0, &headers).await;
        let reviews = self.reviews(0, &headers).await;
        h::html(render_page(
            session_user(req).as_deref(),
            &details,
            &reviews,
        ))
    }
}

/// What productpage sends its callees: the propagated headers of the
/// incoming request plus `end-user` from the session.
fn forward_headers(req: &Req) -> HeaderMap {
    let mut headers = h::forward_headers(&req.headers, h::PROPAGATED);
    if let Some(user) = session_user(req) {
        if let Ok(v) = HeaderValue::from_str(&user) {
            headers.insert("end-user", v);
        }
    }
    headers
}

fn session_user(req: &Req) -> Option<String> {
    req.headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .and_then(|(_, value)| {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(value)
                .ok()?;
            let v: Value = serde_json::from_slice(&raw).ok()?;
            v.get("user")?.as_str().map(str::to_string)
        })
        .filter(|u| !u.is_empty())
}

fn back_to(req: &Req) -> String {
    req.header(REFERER.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| "/productpage".to_string())
}

fn login(req: &Req) -> Resp {
    let form = h::query_pairs(&String::from_utf8_lossy(&req.body));
    let user = form
        .iter()
        .find(|(k, _)| k == "username")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let value = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({ "user": user }).to_string());
    let mut resp = h::redirect(&back_to(req));
    if let Ok(v) = HeaderValue::from_str(&format!("{SESSION_COOKIE}={value}; HttpOnly; Path=/")) {
        resp.headers_mut().insert(SET_COOKIE, v);
    }
    resp
}

fn logout(req: &Req) -> Resp {
    let mut resp = h::redirect(&back_to(req));
    resp.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_static(
            "session=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; HttpOnly; Path=/",
        ),
    );
    resp
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A JSON value as page text (strings without their quotes).
fn show(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => escape(s),
        Some(other) => escape(&other.to_string()),
        None => String::new(),
    }
}

fn index_page() -> String {
    "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>Simple Bookstore App</title>\n</head>\n<body>\n<h3>Hello! This is a simple bookstore application consisting of three services as shown below</h3>\n<p>Click on one of the links below to auto generate a request to the backend as a real user or a tester</p>\n<p><a href=\"/productpage?u=normal\">Normal user</a></p>\n<p><a href=\"/productpage?u=test\">Test user</a></p>\n</body>\n</html>\n".to_string()
}

fn render_page(user: Option<&str>, details: &Called, reviews: &Called) -> String {
    let mut page = String::from(
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>Simple Bookstore App</title>\n</head>\n<body>\n<nav>\n<a href=\"#\">BookInfo Sample</a>\n",
    );
    match user {
        Some(user) => page.push_str(&format!(
            "<span id=\"signed-in-user\">{}</span>\n<a href=\"logout\">sign out</a>\n",
            escape(user)
        )),
        None => page.push_str(
            "<form method=\"post\" action=\"login\">\n<input type=\"text\" name=\"username\" placeholder=\"User Name\">\n<input type=\"password\" name=\"passwd\" placeholder=\"Password\">\n<button type=\"submit\">Sign in</button>\n</form>\n",
        ),
    }
    page.push_str(&format!(
        "</nav>\n<div id=\"product\">\n<h1>{TITLE}</h1>\n<p>Summary: {DESCRIPTION}</p>\n</div>\n"
    ));

    page.push_str("<div id=\"details\">\n");
    if details.status == StatusCode::OK {
        page.push_str("<h4>Book Details</h4>\n<dl>\n");
        for (label, key) in [
            ("Type", "type"),
            ("Pages", "pages"),
            ("Publisher", "publisher"),
            ("Language", "language"),
            ("ISBN-10", "ISBN-10"),
            ("ISBN-13", "ISBN-13"),
        ] {
            page.push_str(&format!(
                "<dt>{label}:</dt><dd>{}</dd>\n",
                show(details.body.get(key))
            ));
        }
        page.push_str("</dl>\n");
    } else {
        page.push_str(&format!(
            "<h4>Error fetching product details</h4>\n<p>{}</p>\n",
            show(details.body.get("error"))
        ));
    }
    page.push_str("</div>\n<div id=\"reviews\">\n");
    if reviews.status == StatusCode::OK {
        page.push_str("<h4>Book Reviews</h4>\n");
        let empty = Vec::new();
        let list = reviews
            .body
            .get("reviews")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        for review in list {
            page.push_str(&format!(
                "<blockquote>\n<p>{}</p>\n<small>{}</small>\n",
                show(review.get("text")),
                show(review.get("reviewer"))
            ));
            if let Some(rating) = review.get("rating") {
                if let Some(stars) = rating.get("stars").and_then(Value::as_u64) {
                    let color = rating
                        .get("color")
                        .and_then(Value::as_str)
                        .unwrap_or("black");
                    let stars = stars.min(5) as usize;
                    page.push_str(&format!(
                        "<div class=\"flex text-{}-500\" data-stars=\"{stars}\">{}{}</div>\n",
                        escape(color),
                        "<span class=\"star-full\">&#9733;</span>".repeat(stars),
                        "<span class=\"star-empty\">&#9734;</span>".repeat(5 - stars),
                    ));
                } else if let Some(error) = rating.get("error") {
                    page.push_str(&format!("<p><i>{}</i></p>\n", show(Some(error))));
                }
            }
            page.push_str("</blockquote>\n");
        }
        page.push_str(&format!(
            "<dl>\n<dt>Reviews served by:</dt>\n<u>{}</u>",
            show(reviews.body.get("podname"))
        ));
        if let Some(cluster) = reviews.body.get("clustername").and_then(Value::as_str) {
            if !cluster.is_empty() && cluster != "null" {
                page.push_str(&format!(
                    "<text> on cluster <u>{}</u></text>",
                    escape(cluster)
                ));
            }
        }
        page.push_str("\n</dl>\n");
    } else {
        page.push_str(&format!(
            "<h4>Error fetching product reviews</h4>\n<p>{}</p>\n",
            show(reviews.body.get("error"))
        ));
    }
    page.push_str("</div>\n</body>\n</html>\n");
    page
}

pub(crate) async fn run(args: &[String]) -> Result<(), SampleError> {
    let upstreams = Upstreams::from_env(|k| std::env::var(k).ok().filter(|v| !v.is_empty()));
    tracing::info!(?upstreams, "productpage callees");
    let listener = h::bind(h::listen_port(positional_port(args), PORT)).await?;
    h::serve(listener, Arc::new(ProductPage { upstreams })).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_follow_the_originals_variables() {
        let u = Upstreams::from_env(|_| None);
        assert_eq!(u.details, "http://details:9080");
        assert_eq!(u.reviews, "http://reviews:9080");
        let u = Upstreams::from_env(|k| match k {
            "SERVICES_DOMAIN" => Some("bookinfo.svc.cluster.local".into()),
            "REVIEWS_HOSTNAME" => Some("reviews-v2".into()),
            "REVIEWS_SERVICE_PORT" => Some("9081".into()),
            _ => None,
        });
        assert_eq!(
            u.reviews,
            "http://reviews-v2.bookinfo.svc.cluster.local:9081"
        );
        assert_eq!(u.ratings, "http://ratings.bookinfo.svc.cluster.local:9080");
    }

    #[test]
    fn page_shows_stars_pod_and_cluster() {
        let details = Called {
            status: StatusCode::OK,
            body: serde_json::from_str(&super::super::bookinfo::details_json(0)).unwrap(),
        };
        let reviews = Called {
            status: StatusCode::OK,
            body: json!({"id": "0", "podname": "reviews-v3-x", "clustername": "cluster1",
                "reviews": [{"reviewer": "Reviewer1", "text": "t", "rating": {"stars": 4, "color": "red"}}]}),
        };
        let page = render_page(Some("jason"), &details, &reviews);
        assert!(page.contains("<title>Simple Bookstore App</title>"));
        assert!(page.contains("text-red-500"));
        assert!(page.contains("Reviews served by:"));
        assert!(page.contains("reviews-v3-x"));
        assert!(page.contains(" on cluster <u>cluster1</u>"));
        assert!(page.contains("PublisherA"));
        assert!(page.contains("jason"));

        let failed = Called {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({ "error": REVIEWS_ERROR }),
        };
        let page = render_page(None, &details, &failed);
        assert!(page.contains("Error fetching product reviews"));
        assert!(page.contains(REVIEWS_ERROR));
        assert!(!page.contains("Reviews served by:"));
    }
}
