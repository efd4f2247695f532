//! httpbin, the request-echo server of most Istio tasks (traffic shifting,
//! fault injection, authorization, egress). It answers with what it
//! received, so tests see which headers the mesh added (`X-Forwarded-Client-Cert`,
//! `X-B3-*`) and control the status and latency (`/status/<code>`,
//! `/delay/<s>`). Two shapes: go-httpbin (port 8080, header values as
//! arrays) and kennethreitz's / kong's (port 80, strings, access log on
//! stdout as gunicorn writes it).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::HeaderValue;
use http::{Method, StatusCode};
use rand::Rng;
use serde_json::{json, Map, Value};

use super::http::{self as h, Handler, Req, Resp};
use super::images::HttpbinFlavor;
use super::SampleError;

/// Longest `/delay` both implementations honour.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// Headers kennethreitz's httpbin hides unless `?show_env=1` (they describe
/// its hosting, not the client).
const ENV_HEADERS: &[&str] = &[
    "x-varnish",
    "x-request-start",
    "x-heroku-queue-depth",
    "x-real-ip",
    "x-forwarded-proto",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-heroku-queue-wait-time",
    "x-forwarded-for",
    "x-heroku-dynos-in-use",
    "x-forwarded-port",
    "x-request-id",
    "via",
    "total-route-time",
    "connect-time",
];

const TEAPOT: &str = "\n    -=[ teapot ]=-\n\n       _...._\n     .'  _ _ `.\n    | .\"` ^ `\". _,\n    \\_;`\"---\"`|//\n      |       ;/\n      \\_     _/\n        `\"\"\"`\n";

struct Httpbin {
    flavor: HttpbinFlavor,
}

impl Httpbin {
    fn go(&self) -> bool {
        self.flavor == HttpbinFlavor::Go
    }

    /// Header names canonicalised, values as arrays (Go) or comma-joined
    /// strings (werkzeug).
    fn headers(&self, req: &Req) -> Value {
        let show_env = h::query_pairs(req.query())
            .iter()
            .any(|(k, _)| k == "show_env");
        let mut map: Map<String, Value> = Map::new();
        for name in req.headers.keys() {
            if !self.go() && !show_env && ENV_HEADERS.contains(&name.as_str()) {
                continue;
            }
            let values: Vec<String> = req
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            let value = if self.go() {
                json!(values)
            } else {
                json!(values.join(","))
            };
            map.insert(h::canonical_header(name.as_str()), value);
        }
        Value::Object(map)
    }

    fn args(&self, pairs: &[(String, String)]) -> Value {
        let mut map: Map<String, Value> = Map::new();
        for (k, v) in pairs {
            match map.get_mut(k) {
                Some(Value::Array(list)) => list.push(json!(v)),
                Some(single) => *single = json!([single.clone(), v]),
                None if self.go() => {
                    map.insert(k.clone(), json!([v]));
                }
                None => {
                    map.insert(k.clone(), json!(v));
                }
            }
        }
        Value::Object(map)
    }

    fn origin(&self, req: &Req) -> String {
        let peer = req.peer.ip().to_string();
        match req.header("x-forwarded-for") {
            Some(xff) if self.go() => xff.split(',').next().unwrap_or(&peer).trim().to_string(),
            Some(xff) => xff.to_string(),
            None => peer,
        }
    }

    fn url(&self, req: &Req) -> String {
        let host = req.header("host").unwrap_or("localhost");
        let scheme = req.header("x-forwarded-proto").unwrap_or("http");
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        format!("{scheme}://{host}{path}")
    }

    /// The `/get` body (also what `/delay` returns).
    fn get_body(&self, req: &Req) -> Value {
        let mut v = json!({
            "args": self.args(&h::query_pairs(req.query())),
            "headers": self.headers(req),
            "origin": self.origin(req),
            "url": self.url(req),
        });
        if self.go() {
            v["method"] = json!(req.method.as_str());
        }
        v
    }

    /// The `/post`, `/put`, `/anything` body: `/get`'s plus what was sent.
    fn data_body(&self, req: &Req) -> Value {
        let mut v = self.get_body(req);
        if !self.go() {
            v["method"] = json!(req.method.as_str());
        }
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let is_form = req
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
        if is_form {
            v["form"] = self.args(&h::query_pairs(&body));
            v["data"] = json!("");
        } else {
            v["form"] = json!({});
            v["data"] = json!(body);
        }
        v["files"] = json!({});
        v["json"] = serde_json::from_slice::<Value>(&req.body).unwrap_or(Value::Null);
        v
    }

    fn status(&self, codes: &str) -> Resp {
        let Some(code) = choose_status(codes) else {
            return h::text(StatusCode::BAD_REQUEST, "Invalid status code\n");
        };
        let Ok(status) = StatusCode::from_u16(code) else {
            return h::text(StatusCode::BAD_REQUEST, "Invalid status code\n");
        };
        let mut resp = match code {
            418 => {
                let body = if self.go() { "I'm a teapot!" } else { TEAPOT };
                let mut r = h::text(status, body);
                r.headers_mut().insert(
                    "x-more-info",
                    HeaderValue::from_static("http://tools.ietf.org/html/rfc2324"),
                );
                r
            }
            402 => h::text(status, "Fuck you, pay me!"),
            _ => h::text(status, ""),
        };
        if (300..400).contains(&code) && code != 304 {
            resp.headers_mut().insert(
                http::header::LOCATION,
                HeaderValue::from_static("/redirect/1"),
            );
        }
        if code == 401 {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Fake Realm\""),
            );
        }
        resp
    }

    fn json(&self, v: &Value) -> Resp {
        let mut body = serde_json::to_string_pretty(v).unwrap_or_default();
        body.push('\n');
        h::json(StatusCode::OK, body)
    }
}

/// `/status/200`, or a weighted choice as both implementations accept:
/// `200:0.9,503:0.1` or `200,503` (equal weights).
fn choose_status(spec: &str) -> Option<u16> {
    let mut choices = Vec::new();
    for part in spec.split(',') {
        let (code, weight) = match part.split_once(':') {
            Some((c, w)) => (c.trim().parse::<u16>().ok()?, w.trim().parse::<f64>().ok()?),
            None => (part.trim().parse::<u16>().ok()?, 1.0),
        };
        choices.push((code, weight));
    }
    let total: f64 = choices.iter().map(|(_, w)| w).sum();
    if choices.is_empty() || total <= 0.0 {
        return None;
    }
    let mut pick = rand::rng().random_range(0.0..total);
    for (code, weight) in &choices {
        if pick < *weight {
            return Some(*code);
        }
        pick -= weight;
    }
    choices.last().map(|(c, _)| *c)
}

/// `/delay/3`, `/delay/0.5`, or (go-httpbin) `/delay/500ms`.
fn parse_delay(s: &str) -> Option<Duration> {
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().ok()? / 1000.0)
    } else {
        Duration::try_from_secs_f64(s.strip_suffix('s').unwrap_or(s).parse().ok()?).ok()?
    };
    Some(d.min(MAX_DELAY))
}

impl Handler for Httpbin {
    async fn handle(&self, req: Req) -> Resp {
        let path = req.path().to_string();
        let resp = self.route(&req, &path).await;
        if !self.go() {
            let size = hyper::body::Body::size_hint(resp.body())
                .exact()
                .unwrap_or(0);
            access_log(&req, resp.status(), size);
        }
        resp
    }
}

impl Httpbin {
    async fn route(&self, req: &Req, path: &str) -> Resp {
        let method = &req.method;
        let method_allowed =
            |m: Method| *method == m || (m == Method::GET && *method == Method::HEAD);
        match path {
            "/" => h::html(format!(
                "<!DOCTYPE html>\n<html>\n<head><title>{}</title></head>\n<body><p>A simple HTTP request and response service.</p></body>\n</html>\n",
                if self.go() { "go-httpbin" } else { "httpbin.org" }
            )),
            "/get" if method_allowed(Method::GET) => self.json(&self.get_body(req)),
            "/headers" => self.json(&json!({ "headers": self.headers(req) })),
            "/ip" => self.json(&json!({ "origin": self.origin(req) })),
            "/user-agent" => self.json(&json!({ "user-agent": req.header("user-agent").unwrap_or("") })),
            "/uuid" => {
                let n: u128 = rand::rng().random();
                let hex = format!("{n:032x}");
                let uuid = format!("{}-{}-4{}-a{}-{}", &hex[..8], &hex[8..12], &hex[13..16], &hex[17..20], &hex[20..]);
                self.json(&json!({ "uuid": uuid }))
            }
            "/post" if method_allowed(Method::POST) => self.json(&self.data_body(req)),
            "/put" if method_allowed(Method::PUT) => self.json(&self.data_body(req)),
            "/patch" if method_allowed(Method::PATCH) => self.json(&self.data_body(req)),
            "/delete" if method_allowed(Method::DELETE) => self.json(&self.data_body(req)),
            "/get" | "/post" | "/put" | "/patch" | "/delete" => {
                h::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n")
            }
            "/response-headers" => {
                let pairs = h::query_pairs(req.query());
                let mut body = Map::new();
                for (k, v) in &pairs {
                    body.insert(k.clone(), json!(v));
                }
                let mut resp = self.json(&Value::Object(body));
                for (k, v) in &pairs {
                    if let (Ok(name), Ok(value)) = (
                        http::header::HeaderName::from_bytes(k.as_bytes()),
                        HeaderValue::from_str(v),
                    ) {
                        resp.headers_mut().append(name, value);
                    }
                }
                resp
            }
            p if p == "/anything" || p.starts_with("/anything/") => self.json(&self.data_body(req)),
            p if p.starts_with("/status/") => self.status(&p["/status/".len()..]),
            p if p.starts_with("/delay/") => match parse_delay(&p["/delay/".len()..]) {
                Some(delay) => {
                    tokio::time::sleep(delay).await;
                    self.json(&self.get_body(req))
                }
                None => h::text(StatusCode::BAD_REQUEST, "Invalid duration\n"),
            },
            _ => h::not_found(),
        }
    }
}

/// gunicorn's access log line, which `kubectl logs` users read.
fn access_log(req: &Req, status: StatusCode, size: u64) {
    let (y, mo, d, hh, mm, ss) = utc_now();
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    println!(
        "{} - - [{d:02}/{}/{y}:{hh:02}:{mm:02}:{ss:02} +0000] \"{} {} {:?}\" {} {size} \"{}\" \"{}\"",
        req.peer.ip(),
        MONTHS[(mo as usize).saturating_sub(1) % 12],
        req.method,
        req.uri.path_and_query().map_or("/", |p| p.as_str()),
        req.version,
        status.as_u16(),
        req.header("referer").unwrap_or("-"),
        req.header("user-agent").unwrap_or("-"),
    );
}

/// Civil UTC date and time of now (days-to-date after Howard Hinnant's
/// public-domain algorithm), to avoid a date crate for one log line.
fn utc_now() -> (i64, u32, u32, u64, u64, u64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The port: go-httpbin's `-port N` flag or `PORT`; gunicorn's `-b
/// host:port` / `--bind=host:port` for the Python images.
fn port_from(flavor: HttpbinFlavor, args: &[String]) -> Option<u16> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f, Some(v.to_string())),
            None => (arg.as_str(), None),
        };
        let flag = flag.trim_start_matches('-');
        let wanted = match flavor {
            HttpbinFlavor::Go => flag == "port",
            _ => flag == "b" || flag == "bind",
        };
        if wanted {
            let value = inline.or_else(|| it.next().cloned())?;
            let port = value.rsplit(':').next().unwrap_or(&value);
            return port.parse().ok();
        }
    }
    match flavor {
        HttpbinFlavor::Go => h::env_port("PORT"),
        _ => None,
    }
}

pub(crate) async fn run(flavor: HttpbinFlavor, args: &[String]) -> Result<(), SampleError> {
    let default = if flavor == HttpbinFlavor::Go {
        8080
    } else {
        80
    };
    let port = h::listen_port(port_from(flavor, args), default);
    let listener = h::bind(port).await?;
    if flavor != HttpbinFlavor::Go {
        // gunicorn's startup lines, which readiness scripts grep for.
        println!("[INFO] Starting gunicorn 19.9.0");
        println!("[INFO] Listening at: http://0.0.0.0:{port}");
    }
    h::serve(listener, Arc::new(Httpbin { flavor })).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_choices() {
        assert_eq!(choose_status("418"), Some(418));
        assert_eq!(choose_status("503:1,200:0"), Some(503));
        assert!(matches!(choose_status("200,503"), Some(200 | 503)));
        assert_eq!(choose_status("abc"), None);
        assert_eq!(choose_status("200:0"), None);
    }

    #[test]
    fn delays() {
        assert_eq!(parse_delay("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_delay("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_delay("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_delay("60"), Some(MAX_DELAY));
        assert_eq!(parse_delay("x"), None);
    }

    #[test]
    fn ports_from_flags() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            port_from(HttpbinFlavor::Go, &s(&["-port", "9000"])),
            Some(9000)
        );
        assert_eq!(
            port_from(
                HttpbinFlavor::Kennethreitz,
                &s(&["-b", "0.0.0.0:8000", "httpbin:app"])
            ),
            Some(8000)
        );
        assert_eq!(
            port_from(HttpbinFlavor::Kong, &s(&["--bind=[::]:81"])),
            Some(81)
        );
    }

    #[test]
    fn dates_are_civil() {
        let (y, mo, d, ..) = utc_now();
        assert!(y >= 2024 && (1..=12).contains(&mo) && (1..=31).contains(&d));
    }
}
