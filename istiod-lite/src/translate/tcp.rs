//! VirtualService `tcp` routes for waypoints: `tcp[].match[].port` and
//! weighted `route[].destination`s become `ambient.waypoint.v1.TcpRoute`s.
//!
//! Part of the VirtualService translation (`l7.rs`), upstream of the delta
//! xDS push: the waypoint picks the destination of a non-HTTP connection
//! to the service from these. One `TcpRoute` per match port (port 0 = any
//! port), in the order written. A match with conditions the waypoint cannot
//! check (source labels, subnets, ...) is dropped rather than widened, and
//! a route whose every match was dropped is dropped too.

use mesh_core::proto::waypoint as pb;
use serde::Deserialize;

use super::l7::{Ctx, L7Error, Rest};

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct VsTcp {
    #[serde(rename = "match")]
    matches: Vec<TcpMatch>,
    route: Vec<TcpRouteDest>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TcpMatch {
    port: Option<u32>,
    gateways: Vec<String>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TcpRouteDest {
    destination: TcpDestination,
    weight: Option<u32>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TcpDestination {
    host: String,
    subset: String,
    port: Option<TcpPort>,
    #[serde(flatten)]
    rest: Rest,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TcpPort {
    number: u32,
    #[serde(flatten)]
    rest: Rest,
}

/// One `tcp` entry (at `path`, e.g. `spec.tcp[0]`) as its `TcpRoute`s.
pub(super) fn convert_tcp(
    cx: &mut Ctx<'_>,
    path: &str,
    t: &VsTcp,
) -> Result<Vec<pb::TcpRoute>, L7Error> {
    cx.rest(path, &t.rest);
    if t.route.is_empty() {
        return Err(cx.err(format!("{path}.route"), "required"));
    }
    let mut destinations = Vec::with_capacity(t.route.len());
    for (j, r) in t.route.iter().enumerate() {
        let p = format!("{path}.route[{j}]");
        cx.rest(&p, &r.rest);
        let dp = format!("{p}.destination");
        let d = &r.destination;
        cx.rest(&dp, &d.rest);
        if d.host.is_empty() {
            return Err(cx.err(format!("{dp}.host"), "required"));
        }
        let port = match &d.port {
            Some(pt) => {
                cx.rest(&format!("{dp}.port"), &pt.rest);
                if pt.number > 65535 {
                    return Err(cx.err(format!("{dp}.port.number"), "not a port number"));
                }
                pt.number
            }
            None => 0,
        };
        destinations.push(pb::Destination {
            host: cx.fqdn(&d.host),
            subset: d.subset.clone(),
            port,
            weight: r.weight.unwrap_or(0),
        });
    }
    if t.matches.is_empty() {
        return Ok(vec![pb::TcpRoute {
            port: 0,
            destinations,
        }]);
    }
    let mut out = Vec::with_capacity(t.matches.len());
    for (j, m) in t.matches.iter().enumerate() {
        let p = format!("{path}.match[{j}]");
        if !m.rest.is_empty() {
            cx.rest(&p, &m.rest);
            cx.unsupported.push(format!("{p} (match entry dropped)"));
            continue;
        }
        if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
            continue;
        }
        let port = m.port.unwrap_or(0);
        if port > 65535 {
            return Err(cx.err(format!("{p}.port"), "not a port number"));
        }
        out.push(pb::TcpRoute {
            port,
            destinations: destinations.clone(),
        });
    }
    Ok(out)
}
