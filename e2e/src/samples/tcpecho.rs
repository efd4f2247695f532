//! Istio's tcp-echo sample (ports 9000, 9001, 9002): a plain TCP server the
//! TCP traffic-shifting and L4 authorization tasks talk to. Every line it
//! reads comes back prefixed, so which version answered shows in the reply
//! (`echo world | nc tcp-echo 9000` -> `hello world`).

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::http as h;
use super::images::PORT_ENV;
use super::SampleError;

const DEFAULT_PORTS: [u16; 3] = [9000, 9001, 9002];
const DEFAULT_PREFIX: &str = "hello";

/// Ports and prefix from the container args: the image's form is
/// `<port[,port...]> <prefix>`; a lone word is taken as the prefix.
pub(crate) fn parse_args(args: &[String]) -> (Vec<u16>, String) {
    let is_ports = |a: &str| !a.is_empty() && a.split(',').all(|p| p.trim().parse::<u16>().is_ok());
    let (ports, rest): (Vec<u16>, &[String]) = match args.split_first() {
        Some((first, rest)) if is_ports(first) => (
            first
                .split(',')
                .filter_map(|p| p.trim().parse().ok())
                .collect(),
            rest,
        ),
        _ => (DEFAULT_PORTS.to_vec(), args),
    };
    let prefix = rest
        .first()
        .cloned()
        .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    (ports, prefix)
}

pub(crate) async fn run(args: &[String]) -> Result<(), SampleError> {
    let (mut ports, prefix) = parse_args(args);
    // The override moves the first port only, enough to run it beside others.
    if let (Some(port), Some(first)) = (h::env_port(PORT_ENV), ports.first_mut()) {
        *first = port;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for port in ports {
        let listener = h::bind(port).await?;
        tracing::info!(port, %prefix, "tcp-echo listening");
        let prefix = prefix.clone();
        tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let prefix = prefix.clone();
                        tokio::spawn(async move {
                            if let Err(e) = echo(stream, &prefix).await {
                                tracing::debug!(%peer, error = %e, "echo connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Echoes whole lines as `<prefix> <line>`; like the original, a last line
/// without a newline is dropped when the client closes.
async fn echo(stream: TcpStream, prefix: &str) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(());
        }
        let mut out = Vec::with_capacity(prefix.len() + 1 + line.len());
        out.extend_from_slice(prefix.as_bytes());
        out.push(b' ');
        out.extend_from_slice(&line);
        write.write_all(&out).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_give_ports_and_prefix() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&s(&["9000,9001,9002", "one"])),
            (vec![9000, 9001, 9002], "one".to_string())
        );
        assert_eq!(
            parse_args(&s(&["9000", "two"])),
            (vec![9000], "two".to_string())
        );
        assert_eq!(
            parse_args(&s(&["hello"])),
            (DEFAULT_PORTS.to_vec(), "hello".to_string())
        );
        assert_eq!(
            parse_args(&[]),
            (DEFAULT_PORTS.to_vec(), "hello".to_string())
        );
    }
}
