//! One small HTTP/1.1 GET (`Connection: close`), enough for sluice's admin endpoint, the
//! baseline relay's `/metrics` and Prometheus' API on loopback.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// `GET path` from `addr`: the status code and the body. `timeout` bounds the connect and
/// each read and write. Content-Length, chunked and read-to-close bodies are understood.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// The body of `GET path`, which must answer 200; anything else is an error that says
/// what came back.
pub fn get_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String> {
    let (status, body) =
        get(addr, path, timeout).with_context(|| format!("GET http://{addr}{path}"))?;
    if status != 200 {
        bail!("GET http://{addr}{path}: status {status}: {}", body.trim());
    }
    Ok(body)
}

fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of the response head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status code"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if body.len() < len {
            return Err(bad("body shorter than its Content-Length"));
        }
        body.truncate(len);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_kind_of_body() {
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokay";
        assert_eq!(parse_response(sized).unwrap(), (200, "ok".into()));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n found\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (404, "not found".into()));
        let to_close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
        assert_eq!(parse_response(to_close).unwrap(), (200, "all of it".into()));
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
