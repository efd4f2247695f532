//! Named network namespaces (`/var/run/netns/NAME`), the building block of the
//! local topology: every node, pod, the bridge and the external host live in
//! one, so the host's own network namespace is never touched.
//!
//! Commands run inside a namespace through `ip netns exec` / `ip -n`; code of
//! the test process runs inside one on a dedicated thread that `setns`es into
//! it (a socket created there stays in that namespace wherever it is used).

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where `ip netns` keeps the bind mounts that name namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Errors of namespace operations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("entering network namespace {name}")]
    Setns {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("the thread running inside network namespace {0} panicked")]
    ThreadPanicked(String),
}

impl NetnsError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NetnsError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A named network namespace. Cheap to clone; it does not delete the namespace
/// on drop (the topology that created it does).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: String,
}

/// Anything that lives in a network namespace (nodes, pods, hosts).
pub trait HasNetns {
    fn netns(&self) -> &Netns;
}

impl HasNetns for Netns {
    fn netns(&self) -> &Netns {
        self
    }
}

impl<T: HasNetns + ?Sized> HasNetns for &T {
    fn netns(&self) -> &Netns {
        (**self).netns()
    }
}

impl Netns {
    /// Creates the namespace with `ip netns add` and brings `lo` up.
    pub fn create(name: &str) -> Result<Netns, NetnsError> {
        run_checked(Command::new("ip").args(["netns", "add", name]), None)?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Refers to an existing namespace by name without checking it exists.
    pub fn from_name(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/NAME`, what `CNI_NETNS` and `setns` consumers expect.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    pub fn exists(&self) -> bool {
        self.path().exists()
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace to completion and returns its stdout;
    /// a non-zero exit is an error carrying stderr. Meant for short
    /// configuration tools (`nft`, `sysctl`), not for test workloads.
    pub fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String, NetnsError> {
        let (program, rest) = args.split_first().ok_or_else(|| {
            NetnsError::io(
                "empty command line",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            )
        })?;
        let mut cmd = self.command(program);
        cmd.args(rest);
        run_checked(&mut cmd, stdin)
    }

    /// `ip -n NAME args...`, returning stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_checked(&mut cmd, None)
    }

    /// Several `ip` commands (one per line, without the leading `ip`) in one
    /// process: `ip -n NAME -batch -`.
    pub fn ip_batch(&self, lines: &[String]) -> Result<(), NetnsError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut script = lines.join("\n");
        script.push('\n');
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name, "-batch", "-"]);
        run_checked(&mut cmd, Some(script.as_bytes())).map(drop)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns
    /// its result. Sockets created by `f` belong to the namespace for their
    /// whole life, so they can be returned and used from any thread.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let handle = self.spawn_thread(f)?;
        handle
            .join()
            .map_err(|_| NetnsError::ThreadPanicked(self.name.clone()))?
    }

    /// Like [`Netns::run_in`] without waiting: the returned handle yields
    /// `Err` if the thread could not enter the namespace.
    pub fn spawn_thread<T, F>(
        &self,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<T, NetnsError>>, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = fs::File::open(self.path())
            .map_err(|e| NetnsError::io(format!("opening {}", self.path().display()), e))?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("netns-{}", short(&name)))
            .spawn(move || {
                // setns only changes this thread's namespace; the thread ends
                // with `f`, so no other work ever runs in the wrong namespace.
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Setns { name, source })?;
                drop(file);
                Ok(f())
            })
            .map_err(|e| NetnsError::io("spawning a namespace thread", e))
    }

    /// Sets a `net.*` sysctl of this namespace (for example
    /// `net.ipv4.ip_forward`). `/proc/sys/net` shows the namespace of the
    /// thread that opens it, so the write happens from inside.
    pub fn set_sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        let path = sysctl_path(key);
        let value = value.to_string();
        self.run_in(move || {
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut f| f.write_all(value.as_bytes()))
                .map_err(|e| NetnsError::io(format!("writing {}", path.display()), e))
        })?
    }

    /// Reads a `net.*` sysctl of this namespace.
    pub fn sysctl(&self, key: &str) -> Result<String, NetnsError> {
        let path = sysctl_path(key);
        self.run_in(move || {
            fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .map_err(|e| NetnsError::io(format!("reading {}", path.display()), e))
        })?
    }

    /// Pids of the processes whose network namespace is this one.
    pub fn pids(&self) -> Result<Vec<i32>, NetnsError> {
        let out = run_checked(Command::new("ip").args(["netns", "pids", &self.name]), None)?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Kills (SIGKILL) every process still inside, then removes the name.
    /// The kernel frees the namespace, and the veths in it, once nothing holds
    /// it any more.
    pub fn delete(&self) -> Result<(), NetnsError> {
        if !self.exists() {
            return Ok(());
        }
        for pid in self.pids().unwrap_or_default() {
            // The process may be gone already; nothing else to do then.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        run_checked(
            Command::new("ip").args(["netns", "delete", &self.name]),
            None,
        )
        .map(drop)
    }
}

/// Names of all named network namespaces on the machine.
pub fn list() -> Result<Vec<String>, NetnsError> {
    let dir = match fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(NetnsError::io(format!("listing {NETNS_DIR}"), e)),
    };
    let mut names: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn short(name: &str) -> &str {
    // Thread names are cut at 15 bytes by the kernel; keep the distinctive tail.
    let start = name.len().saturating_sub(8);
    name.get(start..).unwrap_or(name)
}

/// Runs a command to completion, returning stdout or an error with stderr.
pub(crate) fn run_checked(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<String, NetnsError> {
    let printable = format!("{cmd:?}");
    let output = node_agent::run_with_stdin(cmd, stdin)
        .map_err(|e| NetnsError::io(format!("running {printable}"), e))?;
    if !output.status.success() {
        return Err(NetnsError::Command {
            command: printable,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.conf.all.rp_filter"),
            PathBuf::from("/proc/sys/net/ipv4/conf/all/rp_filter")
        );
    }

    #[test]
    fn thread_names_keep_the_tail() {
        assert_eq!(short("e2e-123-0-n-node1"), "-n-node1");
        assert_eq!(short("ab"), "ab");
    }
}
