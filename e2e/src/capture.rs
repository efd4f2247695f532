//! Packet captures on the test network: `tcpdump` inside a namespace (for
//! example on a node's port of the shared bridge, where all of a node's
//! traffic passes) writing a pcap file that tests search, e.g. to prove that
//! plaintext never crosses the wire between nodes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::netns::HasNetns;
use crate::topology::{Process, Topology, TopologyError};

/// Bound on tcpdump starting up and on it flushing after the stop signal.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the capture file must stay unchanged before stopping, and the
/// bound on waiting for that (traffic may never pause).
const SETTLE_QUIET: Duration = Duration::from_millis(300);
const SETTLE_LIMIT: Duration = Duration::from_secs(5);
const PCAP_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;

/// Errors of packet captures.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("starting tcpdump")]
    Start(#[source] Box<TopologyError>),
    #[error("tcpdump on {iface} exited before it was listening: {stderr}")]
    Exited { iface: String, stderr: String },
    #[error("tcpdump on {iface} not listening after {after:?}: {stderr}")]
    NotListening {
        iface: String,
        after: Duration,
        stderr: String,
    },
    #[error("stopping tcpdump")]
    Stop(#[source] Box<TopologyError>),
    #[error("reading capture file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed pcap data: {0}")]
    Malformed(&'static str),
}

/// A running `tcpdump -U -w FILE`, stopped with [`Capture::stop`] (or killed
/// with its topology).
#[derive(Debug)]
pub struct Capture {
    process: Process,
    file: PathBuf,
    iface: String,
}

impl Capture {
    /// Starts capturing on `iface` inside `ns`, with a pcap `filter` (empty
    /// for everything), and returns once tcpdump is listening.
    pub fn start(
        topo: &Topology,
        ns: &impl HasNetns,
        iface: &str,
        filter: &str,
    ) -> Result<Capture, CaptureError> {
        let file = topo.temp_path(&format!("{iface}.pcap"));
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "-n", "-U", "--immediate-mode", "-s", "0"])
            // Debian's tcpdump drops to user `tcpdump` after opening the
            // interface, which could not write into the run directory.
            .args(["-Z", "root", "-w"])
            .arg(&file);
        if !filter.trim().is_empty() {
            cmd.arg(filter);
        }
        let process = topo
            .spawn_named(ns, &format!("tcpdump-{iface}"), cmd)
            .map_err(|e| CaptureError::Start(Box::new(e)))?;
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            // tcpdump announces on stderr once the capture is active.
            if process.stderr().contains("listening on") {
                break;
            }
            if !process.is_running() {
                return Err(CaptureError::Exited {
                    iface: iface.to_string(),
                    stderr: process.stderr(),
                });
            }
            if Instant::now() >= deadline {
                let _ = process.kill();
                return Err(CaptureError::NotListening {
                    iface: iface.to_string(),
                    after: STEP_TIMEOUT,
                    stderr: process.stderr(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Capture {
            process,
            file,
            iface: iface.to_string(),
        })
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.file
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Stops tcpdump and returns the raw pcap bytes.
    ///
    /// On SIGINT tcpdump leaves the loop without reading what is still in the
    /// kernel's capture ring (its exit statistics then show more packets
    /// "received by filter" than "captured"), so first wait until the file
    /// has stopped growing for a moment (bounded).
    pub fn stop(self) -> Result<Vec<u8>, CaptureError> {
        self.settle();
        self.process
            .signal(Signal::SIGINT)
            .map_err(|e| CaptureError::Stop(Box::new(e)))?;
        let exited = self
            .process
            .wait_timeout(STEP_TIMEOUT)
            .map_err(|e| CaptureError::Stop(Box::new(e)))?;
        if exited.is_none() {
            self.process
                .kill()
                .map_err(|e| CaptureError::Stop(Box::new(e)))?;
        }
        let stats = self.process.stderr();
        if let Some((captured, received)) = exit_counts(&stats) {
            if captured < received {
                eprintln!(
                    "e2e: capture on {} kept {captured} of {received} matching packets",
                    self.iface
                );
            }
        }
        fs::read(&self.file).map_err(|source| CaptureError::Read {
            path: self.file.clone(),
            source,
        })
    }
}

impl Capture {
    fn settle(&self) {
        let size = || fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut last = size();
        let mut quiet_since = Instant::now();
        while Instant::now() < deadline && self.process.is_running() {
            std::thread::sleep(Duration::from_millis(25));
            let now = size();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= SETTLE_QUIET {
                return;
            }
        }
    }
}

/// `(captured, received by filter)` from tcpdump's exit statistics.
fn exit_counts(stderr: &str) -> Option<(u64, u64)> {
    let count = |suffix: &str| {
        stderr.lines().find_map(|line| {
            let (n, rest) = line.trim().split_once(' ')?;
            let rest = rest
                .strip_prefix("packets ")
                .or(rest.strip_prefix("packet "))?;
            (rest == suffix).then(|| n.parse().ok()).flatten()
        })
    };
    Some((count("captured")?, count("received by filter")?))
}

/// Whether `needle` occurs anywhere in `haystack` (a payload inside a pcap).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The captured frames of a classic pcap file (either byte order), so a test
/// can check that a capture saw traffic at all before asserting what it did
/// not contain.
pub fn packets(pcap: &[u8]) -> Result<Vec<&[u8]>, CaptureError> {
    let header = pcap
        .get(..PCAP_HEADER_LEN)
        .ok_or(CaptureError::Malformed("shorter than the file header"))?;
    let magic = [header[0], header[1], header[2], header[3]];
    let read_u32: fn([u8; 4]) -> u32 = match magic {
        // Microsecond and nanosecond timestamp variants.
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => u32::from_le_bytes,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => u32::from_be_bytes,
        _ => return Err(CaptureError::Malformed("unknown magic number")),
    };
    let mut frames = Vec::new();
    let mut rest = &pcap[PCAP_HEADER_LEN..];
    while !rest.is_empty() {
        let record = rest
            .get(..RECORD_HEADER_LEN)
            .ok_or(CaptureError::Malformed("truncated record header"))?;
        let incl = read_u32([record[8], record[9], record[10], record[11]]) as usize;
        let body = rest
            .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN.saturating_add(incl))
            .ok_or(CaptureError::Malformed("truncated packet"))?;
        frames.push(body);
        rest = &rest[RECORD_HEADER_LEN + incl..];
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_le(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(&(f.len() as u32).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn reads_tcpdump_exit_statistics() {
        let stderr = "tcpdump: listening on n1\n1 packet captured\n12 packets received by filter\n0 packets dropped by kernel\n";
        assert_eq!(exit_counts(stderr), Some((1, 12)));
        assert_eq!(exit_counts("tcpdump: listening on n1\n"), None);
    }

    #[test]
    fn finds_needles() {
        assert!(contains(b"xxhello worldyy", b"hello world"));
        assert!(!contains(b"hello wor", b"hello world"));
        assert!(contains(b"abc", b""));
    }

    #[test]
    fn parses_frames() {
        let data = pcap_le(&[b"one", b"", b"three"]);
        let frames = packets(&data).unwrap();
        assert_eq!(frames, vec![&b"one"[..], b"", b"three"]);
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(packets(b"short").is_err());
        let mut data = pcap_le(&[b"frame"]);
        data.truncate(data.len() - 1);
        assert!(matches!(
            packets(&data),
            Err(CaptureError::Malformed("truncated packet"))
        ));
        let mut data = pcap_le(&[]);
        data[0] = 0;
        assert!(packets(&data).is_err());
        let mut huge = pcap_le(&[]);
        huge.extend_from_slice(&[0; 8]);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(packets(&huge).is_err());
    }
}
