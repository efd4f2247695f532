//! Which built-in sample app a container image stands for. The local kubelet
//! asks [`app_for_image`] for every container it starts: a known application
//! image runs as the `sample-app` binary (see [`SampleApp::argv`]) inside the
//! pod's network namespace, so the sample manifests of Istio and others apply
//! unchanged; a tool image such as curl runs the container's own command.

use std::fmt;
use std::str::FromStr;

/// Name of the binary that runs every built-in sample app.
pub const BINARY: &str = "sample-app";

/// Environment variable that overrides the (first) listening port of any
/// sample app. Tests use it to fit several apps on one loopback address;
/// `0` picks a free port, announced on stderr as `listening on <addr>`.
pub const PORT_ENV: &str = "SAMPLE_APP_PORT";

/// Bookinfo details versions: v2 is built with the external book service
/// enabled (it asks Google Books, the egress tasks' example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetailsVersion {
    V1,
    V2,
}

/// Bookinfo reviews versions: they differ in whether and how ratings show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReviewsVersion {
    /// No ratings call, no stars.
    V1,
    /// Ratings with black stars, ratings timeout 10 s.
    V2,
    /// Ratings with red stars, ratings timeout 2.5 s.
    V3,
}

/// The three httpbin images in common use; they differ in port and in the
/// shape of the JSON they return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpbinFlavor {
    /// `mccutchen/go-httpbin`: port 8080 (`PORT`), header values as arrays.
    Go,
    /// `kennethreitz/httpbin`: port 80, header values as strings.
    Kennethreitz,
    /// `kong/httpbin`: a maintained fork of kennethreitz's, same behaviour.
    Kong,
}

/// Istio's helloworld sample versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HelloWorldVersion {
    V1,
    V2,
}

/// A built-in sample app (or tool image) a container image maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleApp {
    ProductPage,
    Details {
        version: DetailsVersion,
    },
    Reviews {
        version: ReviewsVersion,
    },
    Ratings,
    Httpbin {
        flavor: HttpbinFlavor,
    },
    /// A tool image: the container's own command (`sleep`, `curl`, ...) runs.
    Curl,
    Fortio,
    TcpEcho,
    HelloWorld {
        version: HelloWorldVersion,
    },
    Podinfo,
}

/// Every app, for listings and round-trip tests.
pub const ALL_APPS: [SampleApp; 16] = [
    SampleApp::ProductPage,
    SampleApp::Details {
        version: DetailsVersion::V1,
    },
    SampleApp::Details {
        version: DetailsVersion::V2,
    },
    SampleApp::Reviews {
        version: ReviewsVersion::V1,
    },
    SampleApp::Reviews {
        version: ReviewsVersion::V2,
    },
    SampleApp::Reviews {
        version: ReviewsVersion::V3,
    },
    SampleApp::Ratings,
    SampleApp::Httpbin {
        flavor: HttpbinFlavor::Go,
    },
    SampleApp::Httpbin {
        flavor: HttpbinFlavor::Kennethreitz,
    },
    SampleApp::Httpbin {
        flavor: HttpbinFlavor::Kong,
    },
    SampleApp::Curl,
    SampleApp::Fortio,
    SampleApp::TcpEcho,
    SampleApp::HelloWorld {
        version: HelloWorldVersion::V1,
    },
    SampleApp::HelloWorld {
        version: HelloWorldVersion::V2,
    },
    SampleApp::Podinfo,
];

impl SampleApp {
    /// The app spec: the first argument of `sample-app`, and what
    /// [`FromStr`] parses back.
    pub fn name(&self) -> &'static str {
        match self {
            SampleApp::ProductPage => "productpage",
            SampleApp::Details { version } => match version {
                DetailsVersion::V1 => "details",
                DetailsVersion::V2 => "details-v2",
            },
            SampleApp::Reviews { version } => match version {
                ReviewsVersion::V1 => "reviews-v1",
                ReviewsVersion::V2 => "reviews-v2",
                ReviewsVersion::V3 => "reviews-v3",
            },
            SampleApp::Ratings => "ratings",
            SampleApp::Httpbin { flavor } => match flavor {
                HttpbinFlavor::Go => "httpbin-go",
                HttpbinFlavor::Kennethreitz => "httpbin-kennethreitz",
                HttpbinFlavor::Kong => "httpbin-kong",
            },
            SampleApp::Curl => "curl",
            SampleApp::Fortio => "fortio",
            SampleApp::TcpEcho => "tcp-echo",
            SampleApp::HelloWorld { version } => match version {
                HelloWorldVersion::V1 => "helloworld-v1",
                HelloWorldVersion::V2 => "helloworld-v2",
            },
            SampleApp::Podinfo => "podinfo",
        }
    }

    /// Ports the app listens on when neither arguments nor environment say
    /// otherwise (what the real image's Deployment declares).
    pub fn default_ports(&self) -> &'static [u16] {
        match self {
            SampleApp::ProductPage
            | SampleApp::Details { .. }
            | SampleApp::Reviews { .. }
            | SampleApp::Ratings => &[9080],
            SampleApp::Httpbin {
                flavor: HttpbinFlavor::Go,
            } => &[8080],
            SampleApp::Httpbin { .. } => &[80],
            SampleApp::Curl => &[],
            // HTTP echo, then the TCP echo port of `fortio server`.
            SampleApp::Fortio => &[8080, 8078],
            SampleApp::TcpEcho => &[9000, 9001, 9002],
            SampleApp::HelloWorld { .. } => &[5000],
            SampleApp::Podinfo => &[9898],
        }
    }

    /// A tool image: the kubelet runs the container's own command instead
    /// of `sample-app`.
    pub fn is_tool(&self) -> bool {
        matches!(self, SampleApp::Curl)
    }

    /// Program names the image's entrypoint goes by; a container `command`
    /// starting with one of them is the app itself, not something else.
    fn entrypoints(&self) -> &'static [&'static str] {
        match self {
            SampleApp::ProductPage => &["python", "python3", "productpage.py"],
            SampleApp::Details { .. } => &["ruby", "details.rb"],
            SampleApp::Ratings => &["node", "ratings.js"],
            SampleApp::Reviews { .. } => &["java", "server"],
            SampleApp::Httpbin {
                flavor: HttpbinFlavor::Go,
            } => &["go-httpbin"],
            SampleApp::Httpbin { .. } => &["gunicorn"],
            SampleApp::Curl => &[],
            SampleApp::Fortio => &["fortio"],
            SampleApp::TcpEcho => &["tcp-echo"],
            SampleApp::HelloWorld { .. } => &["gunicorn"],
            SampleApp::Podinfo => &["podinfo"],
        }
    }

    /// Arguments for the `sample-app` binary (after the program path) that
    /// run this app for a container with the given `command` and `args`
    /// (`spec.containers[].command` / `.args`, empty when unset): the app
    /// spec, then the container's command without its entrypoint, then its
    /// args. `None` for tool images: run the container's command itself.
    pub fn argv(&self, command: &[String], args: &[String]) -> Option<Vec<String>> {
        if self.is_tool() {
            return None;
        }
        let command = match command.split_first() {
            Some((program, rest)) if self.entrypoints().contains(&basename(program)) => rest,
            _ => command,
        };
        let mut argv = vec![self.name().to_string()];
        argv.extend(command.iter().cloned());
        argv.extend(args.iter().cloned());
        Some(argv)
    }
}

impl fmt::Display for SampleApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An app spec that names no built-in app.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown sample app {0:?}")]
pub struct UnknownApp(pub String);

impl FromStr for SampleApp {
    type Err = UnknownApp;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_APPS
            .iter()
            .copied()
            .find(|app| app.name() == s)
            .ok_or_else(|| UnknownApp(s.to_string()))
    }
}

/// The built-in app an image reference stands for, matched on its
/// repository name with the registry, tag and digest ignored (they only
/// differ by mirror and release). `None` for images we do not emulate.
pub fn app_for_image(image: &str) -> Option<SampleApp> {
    let (owner, name) = repository(image);
    let app = match name {
        "examples-bookinfo-productpage-v1" => SampleApp::ProductPage,
        "examples-bookinfo-details-v1" => SampleApp::Details {
            version: DetailsVersion::V1,
        },
        "examples-bookinfo-details-v2" => SampleApp::Details {
            version: DetailsVersion::V2,
        },
        "examples-bookinfo-ratings-v1" => SampleApp::Ratings,
        "examples-bookinfo-reviews-v1" => SampleApp::Reviews {
            version: ReviewsVersion::V1,
        },
        "examples-bookinfo-reviews-v2" => SampleApp::Reviews {
            version: ReviewsVersion::V2,
        },
        "examples-bookinfo-reviews-v3" => SampleApp::Reviews {
            version: ReviewsVersion::V3,
        },
        "go-httpbin" => SampleApp::Httpbin {
            flavor: HttpbinFlavor::Go,
        },
        "httpbin" if owner == Some("kong") => SampleApp::Httpbin {
            flavor: HttpbinFlavor::Kong,
        },
        "httpbin" => SampleApp::Httpbin {
            flavor: HttpbinFlavor::Kennethreitz,
        },
        "curl" => SampleApp::Curl,
        "fortio" => SampleApp::Fortio,
        "tcp-echo-server" => SampleApp::TcpEcho,
        "examples-helloworld-v1" => SampleApp::HelloWorld {
            version: HelloWorldVersion::V1,
        },
        "examples-helloworld-v2" => SampleApp::HelloWorld {
            version: HelloWorldVersion::V2,
        },
        "podinfo" => SampleApp::Podinfo,
        _ => return None,
    };
    Some(app)
}

/// The `sample-app` arguments for a container (`image`, and its `command`
/// and `args` as in the Pod spec, empty when unset): `None` when the image
/// is not built in or is a tool image, so the container's own command runs.
pub fn sample_app_argv(image: &str, command: &[String], args: &[String]) -> Option<Vec<String>> {
    app_for_image(image)?.argv(command, args)
}

/// Maps a command run inside a pod (`kubectl exec ... -- fortio load ...`)
/// to `sample-app` arguments when it names a built-in tool, so the fortio
/// image's `fortio` (or `/usr/bin/fortio`) works as in the real image.
pub fn builtin_command(argv: &[String]) -> Option<Vec<String>> {
    let (program, rest) = argv.split_first()?;
    if basename(program) != "fortio" {
        return None;
    }
    let mut out = vec![SampleApp::Fortio.name().to_string()];
    out.extend(rest.iter().cloned());
    Some(out)
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Splits an image reference into (owner, repository name): the last two
/// path components after removing the registry host, tag and digest.
fn repository(image: &str) -> (Option<&str>, &str) {
    let without_digest = image.split('@').next().unwrap_or(image);
    // A tag follows the last ':' only when no '/' comes after it (a ':'
    // before a '/' is a registry port).
    let without_tag = match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    };
    let mut parts: Vec<&str> = without_tag.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            parts.remove(0);
        }
    }
    let name = parts.pop().unwrap_or("");
    (parts.pop(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_map_to_apps() {
        let v2 = SampleApp::Reviews {
            version: ReviewsVersion::V2,
        };
        let cases: &[(&str, Option<SampleApp>)] = &[
            (
                "docker.io/istio/examples-bookinfo-reviews-v2:1.20.1",
                Some(v2),
            ),
            (
                "registry.istio.io/release/examples-bookinfo-reviews-v2:1.18.0",
                Some(v2),
            ),
            ("istio/examples-bookinfo-reviews-v2", Some(v2)),
            (
                "docker.io/istio/examples-bookinfo-reviews-v1:1.16.2",
                Some(SampleApp::Reviews {
                    version: ReviewsVersion::V1,
                }),
            ),
            (
                "registry.istio.io/release/examples-bookinfo-reviews-v3:1.20.2",
                Some(SampleApp::Reviews {
                    version: ReviewsVersion::V3,
                }),
            ),
            (
                "docker.io/istio/examples-bookinfo-productpage-v1:1.20.1",
                Some(SampleApp::ProductPage),
            ),
            (
                "docker.io/istio/examples-bookinfo-details-v1:1.20.1",
                Some(SampleApp::Details {
                    version: DetailsVersion::V1,
                }),
            ),
            (
                "docker.io/istio/examples-bookinfo-details-v2:1.20.1",
                Some(SampleApp::Details {
                    version: DetailsVersion::V2,
                }),
            ),
            (
                "registry.istio.io/release/examples-bookinfo-ratings-v1:1.19.1",
                Some(SampleApp::Ratings),
            ),
            ("curlimages/curl", Some(SampleApp::Curl)),
            ("docker.io/curlimages/curl:8.16.0", Some(SampleApp::Curl)),
            (
                "mccutchen/go-httpbin:v2.15.0",
                Some(SampleApp::Httpbin {
                    flavor: HttpbinFlavor::Go,
                }),
            ),
            (
                "kennethreitz/httpbin",
                Some(SampleApp::Httpbin {
                    flavor: HttpbinFlavor::Kennethreitz,
                }),
            ),
            (
                "docker.io/kong/httpbin:0.1.0",
                Some(SampleApp::Httpbin {
                    flavor: HttpbinFlavor::Kong,
                }),
            ),
            ("fortio/fortio:latest_release", Some(SampleApp::Fortio)),
            ("docker.io/fortio/fortio", Some(SampleApp::Fortio)),
            (
                "docker.io/istio/tcp-echo-server:1.3",
                Some(SampleApp::TcpEcho),
            ),
            (
                "registry.istio.io/release/tcp-echo-server:1.3",
                Some(SampleApp::TcpEcho),
            ),
            (
                "docker.io/istio/examples-helloworld-v2",
                Some(SampleApp::HelloWorld {
                    version: HelloWorldVersion::V2,
                }),
            ),
            (
                "quay.io/stefanprodan/podinfo:6.7.1",
                Some(SampleApp::Podinfo),
            ),
            (
                "localhost:5000/istio/examples-bookinfo-ratings-v1",
                Some(SampleApp::Ratings),
            ),
            (
                "docker.io/istio/examples-bookinfo-ratings-v1@sha256:abcd",
                Some(SampleApp::Ratings),
            ),
            ("nginx:1.27", None),
            ("docker.io/library/redis", None),
            ("example.com/unknown/thing:1", None),
            ("", None),
        ];
        for (image, want) in cases {
            assert_eq!(app_for_image(image), *want, "{image}");
        }
    }

    #[test]
    fn names_round_trip() {
        for app in ALL_APPS {
            assert_eq!(app.name().parse::<SampleApp>(), Ok(app));
        }
        assert!("nope".parse::<SampleApp>().is_err());
    }

    #[test]
    fn argv_strips_the_entrypoint_and_keeps_args() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            SampleApp::Fortio.argv(&s(&["/usr/bin/fortio", "server"]), &[]),
            Some(s(&["fortio", "server"]))
        );
        assert_eq!(
            SampleApp::TcpEcho.argv(&[], &s(&["9000,9001,9002", "hello"])),
            Some(s(&["tcp-echo", "9000,9001,9002", "hello"]))
        );
        assert_eq!(
            SampleApp::Podinfo.argv(&s(&["./podinfo", "--port=9898"]), &[]),
            Some(s(&["podinfo", "--port=9898"]))
        );
        assert_eq!(SampleApp::Curl.argv(&s(&["sleep", "3650d"]), &[]), None);
        assert_eq!(
            SampleApp::ProductPage.argv(&[], &[]),
            Some(s(&["productpage"]))
        );
    }

    #[test]
    fn exec_of_fortio_runs_the_builtin() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            builtin_command(&s(&["/usr/bin/fortio", "load", "-c", "2", "http://h/"])),
            Some(s(&["fortio", "load", "-c", "2", "http://h/"]))
        );
        assert_eq!(builtin_command(&s(&["curl", "http://h/"])), None);
        assert_eq!(builtin_command(&[]), None);
    }

    #[test]
    fn ports_follow_the_images() {
        assert_eq!(SampleApp::ProductPage.default_ports(), &[9080]);
        assert_eq!(
            SampleApp::Httpbin {
                flavor: HttpbinFlavor::Go
            }
            .default_ports(),
            &[8080]
        );
        assert_eq!(
            SampleApp::Httpbin {
                flavor: HttpbinFlavor::Kennethreitz
            }
            .default_ports(),
            &[80]
        );
        assert_eq!(SampleApp::TcpEcho.default_ports(), &[9000, 9001, 9002]);
        assert!(SampleApp::Curl.default_ports().is_empty());
    }
}
