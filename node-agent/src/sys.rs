//! Finding a running pod's network namespace when the agent did not hear of
//! it from the CNI plugin: a pod enrolled after it started (its namespace
//! labelled later), or every pod after the agent restarted. The agent scans
//! the named namespaces of the node (`/var/run/netns/*`), enters each from a
//! short-lived thread and compares the addresses of its interfaces with the
//! pod's IPs. Entering a namespace is per thread, so nothing else of the
//! agent ever runs in a pod's namespace.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;

/// Errors of looking into a namespace.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("opening network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("entering network namespace {path}")]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("listing the addresses in network namespace {path}")]
    Addrs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("starting a thread to enter network namespace {path}")]
    Thread {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the thread inside network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// The non-loopback addresses of the interfaces in the namespace at `path`.
pub fn netns_addresses(path: &Path) -> Result<BTreeSet<IpAddr>, SysError> {
    let file = std::fs::File::open(path).map_err(|source| SysError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let p = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("netns-scan".into())
        .spawn(move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                SysError::Setns {
                    path: p.clone(),
                    source,
                }
            })?;
            let addrs = nix::ifaddrs::getifaddrs().map_err(|source| SysError::Addrs {
                path: p.clone(),
                source,
            })?;
            let mut out = BTreeSet::new();
            for a in addrs {
                let Some(addr) = a.address else { continue };
                let ip = if let Some(v4) = addr.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if !ip.is_loopback() {
                    out.insert(ip);
                }
            }
            Ok(out)
        })
        .map_err(|source| SysError::Thread {
            path: path.to_path_buf(),
            source,
        })?;
    handle
        .join()
        .map_err(|_| SysError::Panicked(path.to_path_buf()))?
}

/// Every namespace file in `dirs` with its addresses. Unreadable entries
/// (a namespace deleted during the scan, a stray file) are skipped with a
/// debug line: the scan is a best-effort search.
pub fn scan(dirs: &[PathBuf]) -> Vec<(PathBuf, BTreeSet<IpAddr>)> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot list network namespaces");
                continue;
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            match netns_addresses(&path) {
                Ok(addrs) => out.push((path, addrs)),
                Err(e) => {
                    tracing::debug!(error = %crate::agent::chain(&e), "skipping network namespace")
                }
            }
        }
    }
    out
}

/// The namespace among `scanned` holding any of `ips`.
pub fn find_by_ips<'a>(
    scanned: &'a [(PathBuf, BTreeSet<IpAddr>)],
    ips: &[IpAddr],
) -> Option<&'a Path> {
    scanned
        .iter()
        .find(|(_, addrs)| ips.iter().any(|ip| addrs.contains(ip)))
        .map(|(p, _)| p.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_matches_any_ip() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "fd00::2".parse().unwrap();
        let scanned = vec![
            (PathBuf::from("/n/x"), BTreeSet::from([a])),
            (PathBuf::from("/n/y"), BTreeSet::from([b])),
        ];
        assert_eq!(find_by_ips(&scanned, &[b]), Some(Path::new("/n/y")));
        assert_eq!(
            find_by_ips(&scanned, &["10.9.9.9".parse().unwrap(), a]),
            Some(Path::new("/n/x"))
        );
        assert_eq!(find_by_ips(&scanned, &[]), None);
    }

    #[test]
    fn missing_namespace_is_an_error() {
        let e = netns_addresses(Path::new("/nonexistent/netns")).unwrap_err();
        assert!(matches!(e, SysError::Open { .. }), "{e}");
        assert!(scan(&[PathBuf::from("/nonexistent")]).is_empty());
    }
}
