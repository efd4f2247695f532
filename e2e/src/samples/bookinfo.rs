//! Bookinfo's backends: details, ratings and reviews v1/v2/v3 (port 9080).
//! productpage calls details and reviews; reviews v2/v3 call ratings, so
//! these are the hops where the mesh's routing, timeouts and policies show.
//! Response bodies reproduce the originals' byte for byte where users read
//! them (reviews' hand-built JSON, ratings' compact JSON).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use super::http::{self as h, Handler, Req, Resp};
use super::images::{DetailsVersion, ReviewsVersion};
use super::{hostname, positional_port, SampleError};

const PORT: u16 = 9080;

// ------------------------------------------------------------------ details

/// The details service; with the external book service enabled (the v2
/// image, or `ENABLE_EXTERNAL_BOOK_SERVICE=true`) it asks Google Books, over
/// plain HTTP on port 80 when `DO_NOT_ENCRYPT=true` (the egress TLS
/// origination task) and over HTTPS otherwise.
struct Details {
    external: bool,
    do_not_encrypt: bool,
}

/// The ISBN of the Comedy of Errors edition the original looks up.
const EXTERNAL_ISBN: &str = "0486424618";
const EXTERNAL_HOST: &str = "www.googleapis.com";

impl Handler for Details {
    async fn handle(&self, req: Req) -> Resp {
        match (req.method.clone(), req.path()) {
            (Method::GET, "/health") => {
                h::json(StatusCode::OK, r#"{"status":"Details is healthy"}"#)
            }
            (Method::GET, path) if path.starts_with("/details/") => {
                let id = match path["/details/".len()..].parse::<i64>() {
                    Ok(id) => id,
                    Err(_) => return details_error("please provide numeric product id"),
                };
                if !self.external {
                    return h::json(StatusCode::OK, details_json(id));
                }
                match self.external_details(id, &req).await {
                    Ok(body) => h::json(StatusCode::OK, body.to_string()),
                    Err(message) => details_error(&message),
                }
            }
            _ => h::not_found(),
        }
    }
}

/// The original answers every failure with 400 and the error's message.
fn details_error(message: &str) -> Resp {
    h::json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({ "error": message }).to_string(),
    )
}

impl Details {
    async fn external_details(&self, id: i64, req: &Req) -> Result<Value, String> {
        if !self.do_not_encrypt {
            // Without a TLS client of its own the app cannot reach the
            // HTTPS endpoint; the page then shows the details error, as the
            // original does when the egress is blocked.
            return Err(format!(
                "HTTPS to {EXTERNAL_HOST} is not supported by the built-in details; set DO_NOT_ENCRYPT=true"
            ));
        }
        let url = format!("http://{EXTERNAL_HOST}:80/books/v1/volumes?q=isbn:{EXTERNAL_ISBN}");
        let headers = h::forward_headers(&req.headers, h::PROPAGATED);
        let resp = h::fetch(
            Method::GET,
            &url,
            &headers,
            Bytes::new(),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let json: Value = serde_json::from_slice(&resp.body)
            .map_err(|e| format!("unexpected response from {EXTERNAL_HOST}: {e}"))?;
        external_book(id, &json).ok_or_else(|| "undefined method `[]' for nil:NilClass".to_string())
    }
}

/// Maps a Google Books answer to the details shape, as the original does.
fn external_book(id: i64, json: &Value) -> Option<Value> {
    let book = json.get("items")?.get(0)?.get("volumeInfo")?;
    let isbn = |kind: &str| {
        book.get("industryIdentifiers")
            .and_then(Value::as_array)
            .and_then(|ids| {
                ids.iter()
                    .find(|i| i.get("type").and_then(Value::as_str) == Some(kind))
            })
            .and_then(|i| i.get("identifier").cloned())
            .unwrap_or(Value::Null)
    };
    let language = if book.get("language").and_then(Value::as_str) == Some("en") {
        "English"
    } else {
        "unknown"
    };
    let print_type = if book.get("printType").and_then(Value::as_str) == Some("BOOK") {
        "paperback"
    } else {
        "unknown"
    };
    Some(serde_json::json!({
        "id": id,
        "author": book.get("authors").and_then(|a| a.get(0)).cloned().unwrap_or(Value::Null),
        "year": book.get("publishedDate").cloned().unwrap_or(Value::Null),
        "type": print_type,
        "pages": book.get("pageCount").cloned().unwrap_or(Value::Null),
        "publisher": book.get("publisher").cloned().unwrap_or(Value::Null),
        "language": language,
        "ISBN-10": isbn("ISBN_10"),
        "ISBN-13": isbn("ISBN_13"),
    }))
}

/// The book every Bookinfo details service describes.
pub(crate) fn details_json(id: i64) -> String {
    format!(
        r#"{{"id":{id},"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,"publisher":"PublisherA","language":"English","ISBN-10":"1234567890","ISBN-13":"123-1234567890"}}"#
    )
}

pub(crate) async fn run_details(
    version: DetailsVersion,
    args: &[String],
) -> Result<(), SampleError> {
    let env_true = |k: &str| std::env::var(k).ok().map(|v| v == "true");
    let details = Details {
        external: env_true("ENABLE_EXTERNAL_BOOK_SERVICE").unwrap_or(version == DetailsVersion::V2),
        do_not_encrypt: env_true("DO_NOT_ENCRYPT").unwrap_or(false),
    };
    let listener = h::bind(h::listen_port(positional_port(args), PORT)).await?;
    h::serve(listener, Arc::new(details)).await
}

// ------------------------------------------------------------------ ratings

/// Ratings keeps the original's in-memory store: `POST /ratings/<id>` with
/// `{"Reviewer1":n,"Reviewer2":m}` changes what later GETs return.
struct Ratings {
    overrides: Mutex<BTreeMap<i64, Value>>,
    /// `SERVICE_VERSION`: `v-faulty`, `v-delayed`, `v-unavailable` and
    /// `v-unhealthy` misbehave on purpose (outlier detection, timeouts).
    service_version: String,
    /// Flipped every minute for `v-unavailable` / `v-unhealthy`.
    unavailable: Arc<std::sync::atomic::AtomicBool>,
}

impl Ratings {
    fn is_unavailable(&self) -> bool {
        self.unavailable.load(std::sync::atomic::Ordering::Relaxed)
    }
}

fn ratings_unavailable() -> Resp {
    h::json(
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"error":"Service unavailable"}"#,
    )
}

impl Handler for Ratings {
    async fn handle(&self, req: Req) -> Resp {
        let path = req.path().to_string();
        if path == "/health" && req.method == Method::GET {
            if self.service_version == "v-unhealthy" && self.is_unavailable() {
                return h::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    r#"{"status":"Ratings is not healthy"}"#,
                );
            }
            return h::json(StatusCode::OK, r#"{"status":"Ratings is healthy"}"#);
        }
        let Some(id) = path.strip_prefix("/ratings/") else {
            return h::not_found();
        };
        let Ok(id) = id.parse::<i64>() else {
            return h::json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"please provide numeric product ID"}"#,
            );
        };
        if req.method == Method::GET {
            match self.service_version.as_str() {
                "v-faulty" if rand::random::<f64>() <= 0.5 => return ratings_unavailable(),
                "v-delayed" if rand::random::<f64>() <= 0.5 => {
                    tokio::time::sleep(Duration::from_secs(7)).await;
                }
                "v-unavailable" | "v-unhealthy" if self.is_unavailable() => {
                    return ratings_unavailable();
                }
                _ => {}
            }
        }
        let mut overrides = match self.overrides.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match req.method {
            Method::GET => {
                let ratings = overrides
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"Reviewer1": 5, "Reviewer2": 4}));
                h::json(StatusCode::OK, ratings_json(id, &ratings))
            }
            Method::POST => match serde_json::from_slice::<Value>(&req.body) {
                Ok(v @ Value::Object(_)) => {
                    overrides.insert(id, v.clone());
                    h::json(StatusCode::OK, ratings_json(id, &v))
                }
                _ => h::json(
                    StatusCode::BAD_REQUEST,
                    r#"{"error":"please provide valid ratings JSON"}"#,
                ),
            },
            _ => h::not_found(),
        }
    }
}

fn ratings_json(id: i64, ratings: &Value) -> String {
    format!(r#"{{"id":{id},"ratings":{ratings}}}"#)
}

pub(crate) async fn run_ratings(args: &[String]) -> Result<(), SampleError> {
    let service_version = std::env::var("SERVICE_VERSION").unwrap_or_default();
    let unavailable = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if matches!(service_version.as_str(), "v-unavailable" | "v-unhealthy") {
        let flag = unavailable.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                flag.fetch_xor(true, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let listener = h::bind(h::listen_port(positional_port(args), PORT)).await?;
    h::serve(
        listener,
        Arc::new(Ratings {
            overrides: Mutex::new(BTreeMap::new()),
            service_version,
            unavailable,
        }),
    )
    .await
}

// ------------------------------------------------------------------ reviews

struct Reviews {
    /// Whether reviews calls ratings at all (v1 does not).
    ratings_enabled: bool,
    star_color: String,
    ratings_url: String,
    ratings_timeout: Duration,
    podname: String,
    /// `None` prints as `null` inside quotes, as the Java original does.
    clustername: Option<String>,
}

/// What the reviews service reads from its environment.
pub(crate) struct ReviewsConfig {
    pub ratings_enabled: bool,
    pub star_color: String,
    pub ratings_url: String,
}

impl ReviewsConfig {
    /// The version decides the defaults (the images bake `ENABLE_RATINGS`
    /// and `STAR_COLOR` in); the variables override them as in the original.
    pub fn from_env(version: ReviewsVersion, env: impl Fn(&str) -> Option<String>) -> Self {
        let (enabled, color) = match version {
            ReviewsVersion::V1 => (false, "black"),
            ReviewsVersion::V2 => (true, "black"),
            ReviewsVersion::V3 => (true, "red"),
        };
        let ratings_enabled = env("ENABLE_RATINGS").map_or(enabled, |v| v == "true");
        let star_color = env("STAR_COLOR").unwrap_or_else(|| color.to_string());
        let domain = env("SERVICES_DOMAIN").map_or_else(String::new, |d| format!(".{d}"));
        let host = env("RATINGS_HOSTNAME").unwrap_or_else(|| "ratings".to_string());
        let port = env("RATINGS_SERVICE_PORT").unwrap_or_else(|| PORT.to_string());
        ReviewsConfig {
            ratings_enabled,
            star_color,
            ratings_url: format!("http://{host}{domain}:{port}/ratings"),
        }
    }
}

impl Handler for Reviews {
    async fn handle(&self, req: Req) -> Resp {
        let path = req.path().to_string();
        if path == "/health" && req.method == Method::GET {
            return h::json(StatusCode::OK, r#"{"status": "Reviews is healthy"}"#);
        }
        let id = match (req.method.clone(), path.strip_prefix("/reviews/")) {
            (Method::GET, Some(id)) => match id.parse::<i64>() {
                Ok(id) => id,
                Err(_) => return h::not_found(),
            },
            _ => return h::not_found(),
        };
        let stars = if self.ratings_enabled {
            Some(self.ratings(id, &req).await)
        } else {
            None
        };
        h::json(StatusCode::OK, self.body(id, stars))
    }
}

impl Reviews {
    /// Stars of Reviewer1 and Reviewer2, `None` when ratings failed.
    async fn ratings(&self, id: i64, req: &Req) -> Option<(Option<i64>, Option<i64>)> {
        let mut headers = h::forward_headers(&req.headers, h::PROPAGATED);
        // Routing on the user (fault injection for `jason`) needs `end-user`
        // to reach ratings too.
        headers.extend(h::forward_headers(&req.headers, &["end-user"]));
        let url = format!("{}/{id}", self.ratings_url);
        match h::fetch(
            Method::GET,
            &url,
            &headers,
            Bytes::new(),
            self.ratings_timeout,
        )
        .await
        {
            Ok(resp) if resp.status == StatusCode::OK => {
                let v: Value = serde_json::from_slice(&resp.body).ok()?;
                let r = v.get("ratings")?;
                Some((
                    r.get("Reviewer1").and_then(Value::as_i64),
                    r.get("Reviewer2").and_then(Value::as_i64),
                ))
            }
            Ok(resp) => {
                tracing::warn!(status = %resp.status, "ratings answered with an error");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "ratings call failed");
                None
            }
        }
    }

    /// The response, built the way the Java service concatenates it (spaces
    /// and all), so byte-level expectations hold.
    fn body(&self, id: i64, stars: Option<Option<(Option<i64>, Option<i64>)>>) -> String {
        let clustername = self.clustername.as_deref().unwrap_or("null");
        let mut out = format!(
            "{{\"id\": \"{id}\",\"podname\": \"{}\",\"clustername\": \"{clustername}\",\"reviews\": [",
            self.podname
        );
        let reviews = [
            (
                "Reviewer1",
                "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
            ),
            (
                "Reviewer2",
                "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
            ),
        ];
        for (i, (reviewer, text)) in reviews.iter().enumerate() {
            out.push_str(&format!(
                "{{  \"reviewer\": \"{reviewer}\",  \"text\": \"{text}\""
            ));
            if let Some(result) = stars {
                let star = result.and_then(|(a, b)| if i == 0 { a } else { b });
                match star {
                    Some(n) => out.push_str(&format!(
                        ", \"rating\": {{\"stars\": {n}, \"color\": \"{}\"}}",
                        self.star_color
                    )),
                    None => out.push_str(
                        ", \"rating\": {\"error\": \"Ratings service is currently unavailable\"}",
                    ),
                }
            }
            out.push('}');
            if i + 1 < reviews.len() {
                out.push(',');
            }
        }
        out.push_str("]}");
        out
    }
}

pub(crate) async fn run_reviews(
    version: ReviewsVersion,
    args: &[String],
) -> Result<(), SampleError> {
    let config = ReviewsConfig::from_env(version, |k| std::env::var(k).ok());
    // The Java original waits 10 s for black-star ratings and 2.5 s otherwise.
    let ratings_timeout = if config.star_color == "black" {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(2500)
    };
    let reviews = Reviews {
        ratings_enabled: config.ratings_enabled,
        star_color: config.star_color,
        ratings_url: config.ratings_url,
        ratings_timeout,
        podname: hostname(),
        clustername: std::env::var("CLUSTER_NAME").ok(),
    };
    let listener = h::bind(h::listen_port(positional_port(args), PORT)).await?;
    h::serve(listener, Arc::new(reviews)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reviews(enabled: bool) -> Reviews {
        Reviews {
            ratings_enabled: enabled,
            star_color: "red".into(),
            ratings_url: String::new(),
            ratings_timeout: Duration::from_secs(1),
            podname: "reviews-v3-abc".into(),
            clustername: None,
        }
    }

    #[test]
    fn reviews_json_is_valid_and_shaped_like_the_original() {
        let body = reviews(true).body(0, Some(Some((Some(5), Some(4)))));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["id"], "0");
        assert_eq!(v["podname"], "reviews-v3-abc");
        assert_eq!(v["clustername"], "null");
        assert_eq!(v["reviews"][0]["rating"]["stars"], 5);
        assert_eq!(v["reviews"][1]["rating"]["color"], "red");
        assert!(body.starts_with("{\"id\": \"0\",\"podname\": \"reviews-v3-abc\""));

        let failed: Value = serde_json::from_str(&reviews(true).body(0, Some(None))).unwrap();
        assert_eq!(
            failed["reviews"][0]["rating"]["error"],
            "Ratings service is currently unavailable"
        );
        let v1: Value = serde_json::from_str(&reviews(false).body(1, None)).unwrap();
        assert!(v1["reviews"][0].get("rating").is_none());
    }

    #[test]
    fn reviews_config_follows_version_and_env() {
        let none = |_: &str| None;
        let c = ReviewsConfig::from_env(ReviewsVersion::V3, none);
        assert!(c.ratings_enabled);
        assert_eq!(c.star_color, "red");
        assert_eq!(c.ratings_url, "http://ratings:9080/ratings");
        let env = |k: &str| match k {
            "SERVICES_DOMAIN" => Some("default.svc.cluster.local".to_string()),
            "RATINGS_SERVICE_PORT" => Some("1234".to_string()),
            _ => None,
        };
        let c = ReviewsConfig::from_env(ReviewsVersion::V1, env);
        assert!(!c.ratings_enabled);
        assert_eq!(
            c.ratings_url,
            "http://ratings.default.svc.cluster.local:1234/ratings"
        );
    }

    #[test]
    fn external_books_map_like_the_original() {
        let answer = serde_json::json!({"items": [{"volumeInfo": {
            "authors": ["William Shakespeare"], "publishedDate": "1996", "printType": "BOOK",
            "pageCount": 80, "publisher": "Dover Publications", "language": "en",
            "industryIdentifiers": [{"type": "ISBN_13", "identifier": "9780486424613"},
                                    {"type": "ISBN_10", "identifier": "0486424618"}]}}]});
        let v = external_book(0, &answer).unwrap();
        assert_eq!(v["type"], "paperback");
        assert_eq!(v["language"], "English");
        assert_eq!(v["ISBN-10"], "0486424618");
        assert_eq!(v["year"], "1996");
        assert!(external_book(0, &serde_json::json!({})).is_none());
    }

    #[test]
    fn details_json_has_the_documented_fields() {
        let v: Value = serde_json::from_str(&details_json(0)).unwrap();
        assert_eq!(v["author"], "William Shakespeare");
        assert_eq!(v["ISBN-13"], "123-1234567890");
        assert_eq!(v["pages"], 200);
    }
}
