//! The request headers an HBONE `CONNECT` carries besides `:authority`.
//!
//! The outbound side builds them from what it knows about the captured
//! connection: `forwarded` (who the original client is, and which service
//! hostname it addressed), `baggage` (the source workload, for the peer's
//! metrics labels) and `traceparent`. The inbound side reads `forwarded` to
//! learn the original client address when the hop came through a waypoint
//! or gateway, and `baggage` for the source labels.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, HeaderValue, FORWARDED};
use http::HeaderMap;

use super::HboneError;

/// W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C baggage header.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// The source network, on the inner `CONNECT` of double HBONE.
pub const X_FORWARDED_NETWORK: HeaderName = HeaderName::from_static("x-forwarded-network");

/// `forwarded: for="<ip:port>"` (RFC 7239; IPv6 in brackets), plus
/// `;host=<hostname>` when the client addressed a service by name.
pub fn forwarded(client: SocketAddr, host: Option<&str>) -> Result<HeaderValue, HboneError> {
    // Display of SocketAddr already brackets IPv6.
    let mut v = format!("for=\"{client}\"");
    if let Some(host) = host {
        v.push_str(";host=");
        if !host.is_empty() && host.bytes().all(is_token_char) {
            v.push_str(host);
        } else {
            v.push('"');
            for c in host.chars() {
                if c == '"' || c == '\\' {
                    v.push('\\');
                }
                v.push(c);
            }
            v.push('"');
        }
    }
    HeaderValue::from_str(&v).map_err(|e| HboneError::BadHeader {
        name: "forwarded",
        reason: e.to_string(),
    })
}

/// RFC 7230 `tchar`.
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The `for` address of the first (original client's) element of a
/// `forwarded` value. A bare IP yields port 0; obfuscated or unknown
/// identifiers and malformed values yield `None`.
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let element = first_element(value)?;
    for pair in split_outside_quotes(element, b';') {
        let (name, val) = pair.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let node = unquote(val.trim())?;
        return parse_node(&node);
    }
    None
}

/// [`parse_forwarded_for`] on the `forwarded` header of `headers`.
pub fn forwarded_for(headers: &HeaderMap) -> Option<SocketAddr> {
    parse_forwarded_for(headers.get(FORWARDED)?.to_str().ok()?)
}

fn first_element(value: &str) -> Option<&str> {
    split_outside_quotes(value, b',')
        .next()
        .filter(|e| !e.trim().is_empty())
}

/// Splits on `sep` where it is not inside a quoted string.
fn split_outside_quotes(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts.into_iter()
}

fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return (!v.is_empty() && v.bytes().all(|b| is_token_char(b) || b == b':'))
            .then(|| v.to_owned());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

fn parse_node(node: &str) -> Option<SocketAddr> {
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let ip = match node.strip_prefix('[') {
        Some(rest) => rest.strip_suffix(']')?.parse::<IpAddr>().ok()?,
        None => node.parse::<std::net::Ipv4Addr>().ok()?.into(),
    };
    Some(SocketAddr::new(ip, 0))
}

/// The source workload as announced in `baggage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// Lower-case kind of the workload: `deployment`, `pod`, `job`,
    /// `cronjob`, ... (becomes `k8s.<kind>.name`).
    pub workload_type: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl Baggage {
    /// Formats the `baggage` value; empty fields are left out.
    pub fn to_header_value(&self) -> Result<HeaderValue, HboneError> {
        let mut out = String::new();
        let mut add = |key: &str, value: &Option<String>| {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                if !out.is_empty() {
                    out.push(',');
                }
                out.push_str(key);
                out.push('=');
                percent_encode(v, &mut out);
            }
        };
        add("k8s.cluster.name", &self.cluster);
        add("k8s.namespace.name", &self.namespace);
        if let Some(kind) = self.workload_type.as_deref().filter(|k| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        }) {
            add(&format!("k8s.{kind}.name"), &self.workload_name);
        }
        add("service.name", &self.service_name);
        add("service.version", &self.service_version);
        HeaderValue::from_str(&out).map_err(|e| HboneError::BadHeader {
            name: "baggage",
            reason: e.to_string(),
        })
    }

    /// Reads the members we know from a `baggage` value, ignoring the rest
    /// and any member that does not decode.
    pub fn parse(value: &str) -> Baggage {
        let mut b = Baggage::default();
        for member in value.split(',') {
            // Properties after ';' carry nothing we use.
            let kv = member.split(';').next().unwrap_or_default();
            let Some((key, val)) = kv.split_once('=') else {
                continue;
            };
            let Some(val) = percent_decode(val.trim()) else {
                continue;
            };
            match key.trim() {
                "k8s.cluster.name" => b.cluster = Some(val),
                "k8s.namespace.name" => b.namespace = Some(val),
                "service.name" => b.service_name = Some(val),
                "service.version" => b.service_version = Some(val),
                other => {
                    if let Some(kind) = other
                        .strip_prefix("k8s.")
                        .and_then(|r| r.strip_suffix(".name"))
                        .filter(|k| !k.is_empty() && !k.contains('.'))
                    {
                        b.workload_type = Some(kind.to_owned());
                        b.workload_name = Some(val);
                    }
                }
            }
        }
        b
    }
}

/// W3C baggage values: everything outside `baggage-octet`, and `%`
/// itself, is percent-encoded (UTF-8 bytes).
fn percent_encode(v: &str, out: &mut String) {
    for b in v.bytes() {
        let plain =
            matches!(b, 0x21 | 0x23..=0x24 | 0x26..=0x2B | 0x2D..=0x3A | 0x3C..=0x5B | 0x5D..=0x7E);
        if plain {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A W3C `traceparent` (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceParent {
    const SAMPLED: u8 = 0x01;

    /// A new trace with random ids; `sampled` sets flag 01.
    pub fn new_random(sampled: bool) -> Self {
        TraceParent {
            trace_id: nonzero(rand::random::<u128>),
            span_id: nonzero(rand::random::<u64>),
            flags: if sampled { Self::SAMPLED } else { 0 },
        }
    }

    /// The same trace with a new span id: what a hop that continues an
    /// incoming trace sends on.
    pub fn child(&self) -> Self {
        TraceParent {
            span_id: nonzero(rand::random::<u64>),
            ..*self
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != "00" {
            return None;
        }
        fn hex_of(s: &str, len: usize) -> Option<&str> {
            (s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                .then_some(s)
        }
        let trace_id = u128::from_str_radix(hex_of(trace, 32)?, 16).ok()?;
        let span_id = u64::from_str_radix(hex_of(span, 16)?, 16).ok()?;
        let flags = u8::from_str_radix(hex_of(flags, 2)?, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn to_header_value(&self) -> HeaderValue {
        // Only lower-case hex and dashes: always a valid header value.
        HeaderValue::from_str(&self.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn nonzero<T: PartialEq + Default>(mut gen: impl FnMut() -> T) -> T {
    loop {
        let v = gen();
        if v != T::default() {
            return v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_formats() {
        let v4: SocketAddr = "10.0.0.1:3456".parse().unwrap();
        assert_eq!(forwarded(v4, None).unwrap(), "for=\"10.0.0.1:3456\"");
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(
            forwarded(v6, Some("reviews.default.svc.cluster.local")).unwrap(),
            "for=\"[fd00::1]:80\";host=reviews.default.svc.cluster.local"
        );
        assert_eq!(
            forwarded(v4, Some("a b")).unwrap(),
            "for=\"10.0.0.1:3456\";host=\"a b\""
        );
        assert!(forwarded(v4, Some("bad\nhost")).is_err());
    }

    #[test]
    fn forwarded_round_trip_and_parse() {
        for addr in ["10.0.0.1:3456", "[fd00::1]:80", "[::ffff:10.1.2.3]:1"] {
            let a: SocketAddr = addr.parse().unwrap();
            let v = forwarded(a, Some("svc.ns")).unwrap();
            assert_eq!(parse_forwarded_for(v.to_str().unwrap()), Some(a));
        }
        assert_eq!(
            parse_forwarded_for("host=x;For=10.1.1.1, for=10.2.2.2"),
            Some("10.1.1.1:0".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("for=\"[2001:db8::17]\""),
            Some("[2001:db8::17]:0".parse().unwrap())
        );
        assert_eq!(
            parse_forwarded_for("by=x;host=\"a;b,c\";for=\"1.2.3.4:5\""),
            Some("1.2.3.4:5".parse().unwrap())
        );
        for bad in [
            "",
            "for=unknown",
            "for=_hidden",
            "for=\"1.2.3.4:5",
            "for=2001:db8::17",
            "for=\"[2001:db8::17\"",
            "for=\"1.2.3.4:99999\"",
            "for",
            "host=x",
            "for=\"a\"b\"",
            ", for=1.2.3.4",
        ] {
            assert_eq!(parse_forwarded_for(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn baggage_round_trip() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_type: Some("deployment".into()),
            workload_name: Some("reviews-v1".into()),
            service_name: Some("reviews".into()),
            service_version: Some("v1, beta;x=%".into()),
        };
        let v = b.to_header_value().unwrap();
        assert_eq!(
            v,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=reviews-v1,\
             service.name=reviews,service.version=v1%2C%20beta%3Bx=%25"
        );
        assert_eq!(Baggage::parse(v.to_str().unwrap()), b);
        let partial = Baggage::parse("k8s.pod.name=p;prop=1, junk, service.name=%zz, other=1");
        assert_eq!(partial.workload_type.as_deref(), Some("pod"));
        assert_eq!(partial.workload_name.as_deref(), Some("p"));
        assert_eq!(partial.service_name, None);
        // An unsafe workload kind would forge another key: dropped.
        let odd = Baggage {
            workload_type: Some("a,b".into()),
            workload_name: Some("n".into()),
            ..Baggage::default()
        };
        assert_eq!(odd.to_header_value().unwrap(), "");
    }

    #[test]
    fn traceparent() {
        let t = TraceParent::new_random(false);
        let s = t.to_string();
        assert_eq!(s.len(), 55);
        assert!(s.starts_with("00-") && s.ends_with("-00"));
        assert_eq!(TraceParent::parse(&s), Some(t));
        assert!(!t.sampled());
        let c = TraceParent::new_random(true).child();
        assert!(c.sampled());
        assert_eq!(c.to_header_value().to_str().unwrap().len(), 55);
        let parsed =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parsed.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(parsed.child().span_id, parsed.span_id);
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }
}
