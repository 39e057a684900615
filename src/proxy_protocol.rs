//! The PROXY protocol (v1 text, v2 binary): parse and read the header a client sends
//! without taking a byte more, encode the one a server gets.
//!
//! The specification is HAProxy's `doc/proxy-protocol.txt`. In short: a sender that
//! relays a client's connection writes, before any of the client's bytes, either one
//! line of text
//!
//! ```text
//! PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n
//! ```
//!
//! or a 16-byte binary block (12-byte signature, version and command, family and
//! transport, length) followed by `length` bytes of addresses and optional TLVs. The
//! receiver uses the addresses in the header instead of the socket's peer address.
//!
//! [`parse`] is a pure function over a byte slice, so the socket code ([`read_header`])
//! and the tests share it. It decides as early as the bytes allow: garbage is rejected
//! from its first wrong byte, and [`Parsed::Incomplete`] is only answered for a prefix
//! of something that can still become a valid header. That second property is what
//! lets [`read_header`] consume every byte it has seen when the answer is `Incomplete`
//! (they all belong to the header) and then block for more, instead of peeking the
//! same bytes in a loop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// `send_proxy` values; serde: "v1" | "v2".
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text line: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// The binary block: cheaper to parse, and the receiver knows its length after 16 bytes.
    V2,
}

/// What a header says: the client's address and the address it connected to.
///
/// Parse results wrap it in `Option`: `None` for v1 `UNKNOWN`, v2 `LOCAL`, or families
/// other than TCP over IPv4/IPv6 (the receiver then uses the real peer, as the
/// specification asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's address as the sender saw it: what access rules, per-client limits,
    /// logs and `/connections` should use instead of the socket's peer.
    pub source: SocketAddr,
    /// The address the client connected to on the sender's side (its listener).
    pub destination: SocketAddr,
}

/// The outcome of [`parse`] on bytes that are, so far, a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header: it is `buf[..length]`; what follows it is the client's stream.
    Complete {
        /// The addresses it carries; `None` when the receiver should use the real peer.
        header: Option<Header>,
        /// How many bytes of the buffer the header takes (never more than the buffer).
        length: usize,
    },
    /// The bytes so far are a prefix of a header that can still be valid: every one of
    /// them belongs to the header, and more are needed.
    Incomplete,
}

/// Why bytes are not a valid PROXY header. The client is reset for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The first bytes are neither `PROXY ` (v1) nor the v2 signature.
    #[error("the connection does not start with a PROXY protocol header")]
    NotProxy,
    /// It starts like a header but breaks the specification; the text says where.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    /// Longer than a v1 line may be ([`V1_MAX_LENGTH`]) or than sluice accepts for v2
    /// ([`V2_MAX_LENGTH`]).
    #[error("PROXY protocol header too long")]
    TooLong,
}

impl ParseError {
    /// A short fixed name, for logs.
    pub fn as_label(&self) -> &'static str {
        match self {
            ParseError::NotProxy => "not_proxy",
            ParseError::Malformed(_) => "malformed",
            ParseError::TooLong => "too_long",
        }
    }
}

/// Why [`read_header`] could not read a header. The client is reset for all of them and
/// counted as `sluice_connections_rejected_total{reason="proxy_protocol"}`.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No complete header within the timeout (a silent client, or one too slow).
    #[error("no PROXY protocol header within the timeout")]
    Timeout,
    /// The client closed the connection before the header was complete.
    #[error("the client closed the connection before the PROXY protocol header was complete")]
    Closed,
    /// The socket failed (typically a reset).
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a valid header.
    #[error(transparent)]
    Parse(#[from] ParseError),
}

impl ReadError {
    /// A short fixed name, for logs.
    pub fn as_label(&self) -> &'static str {
        match self {
            ReadError::Timeout => "timeout",
            ReadError::Closed => "closed",
            ReadError::Io(_) => "io",
            ReadError::Parse(error) => error.as_label(),
        }
    }
}

/// The longest v1 line, CRLF included, that the specification lets a receiver accept
/// (`PROXY UNKNOWN` with two full IPv6 addresses and ports).
pub const V1_MAX_LENGTH: usize = 107;

/// The longest v2 header sluice accepts: the 16 fixed bytes and at most 2048 bytes of
/// addresses and TLVs. The format allows 16 + 65535, but every TLV registered today
/// (ALPN, authority, a 128-byte unique id, SSL version/cipher/CN, AWS and Azure
/// endpoint ids) fits many times over in 2 KiB, and a cap keeps what one unauthenticated
/// connection can make sluice buffer (and wait for) small. Beyond it: [`ParseError::TooLong`].
pub const V2_MAX_LENGTH: usize = V2_FIXED_LENGTH + 2048;

/// The most bytes any header sluice accepts can take: what [`read_header`] may buffer.
pub const MAX_LENGTH: usize = V2_MAX_LENGTH;

/// A v1 header starts with these 6 bytes ("PROXY" and exactly one space).
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// A v2 header starts with these 12 bytes, chosen to be rejected by most other protocols.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Signature, version and command, family and transport, length.
const V2_FIXED_LENGTH: usize = 16;

/// The high nibble of byte 13: the only version v2 defines.
const V2_VERSION: u8 = 0x2;

/// v2 commands (low nibble of byte 13).
const V2_LOCAL: u8 = 0x0;
const V2_PROXY: u8 = 0x1;

/// v2 family and transport (byte 14) for the two that carry TCP addresses.
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// Parses the start of `buf`.
///
/// `Ok(Complete)` when `buf` starts with a whole valid header, `Ok(Incomplete)` when all
/// of `buf` is a prefix of a header that may still be valid (an empty `buf` included), and
/// `Err` as soon as the bytes seen cannot be one. Never panics, never reads past `buf`,
/// never says `Complete` with `length > buf.len()`.
pub fn parse(buf: &[u8]) -> Result<Parsed, ParseError> {
    if starts_like(buf, V1_SIGNATURE) {
        if buf.len() < V1_SIGNATURE.len() {
            // Both signatures share no first byte, so a prefix of one is not the other's.
            return Ok(Parsed::Incomplete);
        }
        parse_v1(buf)
    } else if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else {
        Err(ParseError::NotProxy)
    }
}

/// Whether `buf` and `signature` agree on the bytes both have.
fn starts_like(buf: &[u8], signature: &[u8]) -> bool {
    let n = buf.len().min(signature.len());
    buf[..n] == signature[..n]
}

/// v1: find the CRLF within [`V1_MAX_LENGTH`] bytes, then check the line's fields. The
/// fields seen so far are checked before the CRLF arrives, so garbage is refused at once
/// rather than after a timeout.
fn parse_v1(buf: &[u8]) -> Result<Parsed, ParseError> {
    let window = &buf[..buf.len().min(V1_MAX_LENGTH)];
    let body = &window[V1_SIGNATURE.len()..];
    match body.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(at) if body[at] == b'\n' => {
            Err(ParseError::Malformed("v1 line ends in LF without CR"))
        }
        Some(at) => match body.get(at + 1) {
            Some(b'\n') => {
                let header = v1_fields(&body[..at], Line::Whole)?;
                Ok(Parsed::Complete {
                    header,
                    length: V1_SIGNATURE.len() + at + 2,
                })
            }
            Some(_) => Err(ParseError::Malformed("v1 line has a CR without LF")),
            None => incomplete_v1(&body[..at], window.len()),
        },
        None => incomplete_v1(body, window.len()),
    }
}

/// The answer for a v1 line whose CRLF has not been seen in `seen` bytes.
fn incomplete_v1(fields: &[u8], seen: usize) -> Result<Parsed, ParseError> {
    v1_fields(fields, Line::Partial)?;
    if seen >= V1_MAX_LENGTH {
        // Not even room left for the CRLF: the line would be longer than the spec allows.
        Err(ParseError::TooLong)
    } else {
        Ok(Parsed::Incomplete)
    }
}

/// Whether a v1 line's text ends at its CRLF or at the end of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// The CRLF was seen: every field must be whole and valid.
    Whole,
    /// More may come: the last field may be cut short, and need only be a prefix of a
    /// valid one.
    Partial,
}

/// The address family a v1 line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// The five fields after `PROXY `: protocol, source and destination address, source and
/// destination port, separated by exactly one space. `Ok(None)` for `UNKNOWN` (whatever
/// follows it) and for a partial line that is valid so far.
fn v1_fields(line: &[u8], end: Line) -> Result<Option<Header>, ParseError> {
    const UNKNOWN: &[u8] = b"UNKNOWN";
    // The receiver "must ignore anything presented before the CRLF" after UNKNOWN.
    if line.starts_with(UNKNOWN) && matches!(line.get(UNKNOWN.len()), None | Some(b' ')) {
        return Ok(None);
    }
    if end == Line::Partial && UNKNOWN.starts_with(line) {
        return Ok(None);
    }

    let mut fields: [&[u8]; 5] = [&[]; 5];
    let mut count = 0;
    for field in line.split(|&b| b == b' ') {
        let slot = fields
            .get_mut(count)
            .ok_or(ParseError::Malformed("v1 line has more than five fields"))?;
        *slot = field;
        count += 1;
    }
    if end == Line::Whole && count < fields.len() {
        return Err(ParseError::Malformed("v1 line has fewer than five fields"));
    }
    // Every field but the last one seen is followed by a space, so it is whole.
    let whole = |index: usize| end == Line::Whole || index + 1 < count;

    let family = match fields[0] {
        b"TCP4" => Family::V4,
        b"TCP6" => Family::V6,
        partial if !whole(0) && (b"TCP4".starts_with(partial) || b"TCP6".starts_with(partial)) => {
            return Ok(None);
        }
        _ => {
            return Err(ParseError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    if !whole(0) {
        return Ok(None);
    }

    let source = v1_address(
        fields[1],
        family,
        whole(1),
        "v1 source address is not valid for its family",
    )?;
    let destination = v1_address(
        fields[2],
        family,
        whole(2),
        "v1 destination address is not valid for its family",
    )?;
    let source_port = v1_port(
        fields[3],
        whole(3),
        "v1 source port is not a decimal in 0..=65535",
    )?;
    let destination_port = v1_port(
        fields[4],
        whole(4),
        "v1 destination port is not a decimal in 0..=65535",
    )?;
    if end == Line::Partial {
        return Ok(None);
    }
    match (source, destination, source_port, destination_port) {
        (Some(source), Some(destination), Some(source_port), Some(destination_port)) => {
            Ok(Some(Header {
                source: SocketAddr::new(source, source_port),
                destination: SocketAddr::new(destination, destination_port),
            }))
        }
        _ => Err(ParseError::Malformed("v1 line has fewer than five fields")),
    }
}

/// One v1 address: `Some` when whole and valid, `None` for a valid prefix of one (or a
/// field not reached yet).
fn v1_address(
    field: &[u8],
    family: Family,
    whole: bool,
    error: &'static str,
) -> Result<Option<IpAddr>, ParseError> {
    if whole {
        // Both parsers are strict: 4 decimal octets without leading zeros; 128 bits of
        // hex groups with at most one `::` (a dotted IPv4 tail, as inet_ntop writes
        // mapped addresses, is accepted: it is unambiguous). No zone, no brackets.
        let text = std::str::from_utf8(field).map_err(|_| ParseError::Malformed(error))?;
        let address = match family {
            Family::V4 => text.parse::<Ipv4Addr>().map(IpAddr::V4),
            Family::V6 => text.parse::<Ipv6Addr>().map(IpAddr::V6),
        };
        return address.map(Some).map_err(|_| ParseError::Malformed(error));
    }
    // A cut-short address. IPv4: the octets so far must be valid and the last may be cut
    // short (a non-empty prefix of a valid octet is one too). IPv6: only the alphabet and
    // the length are checked before the field ends.
    let valid_so_far = match family {
        Family::V4 => {
            let parts = field.split(|&b| b == b'.').count();
            parts <= 4
                && field
                    .split(|&b| b == b'.')
                    .enumerate()
                    .all(|(index, octet)| {
                        (index + 1 == parts && octet.is_empty()) || decimal(octet, 255).is_some()
                    })
        }
        Family::V6 => {
            field.len() <= 45
                && field
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        }
    };
    if valid_so_far {
        Ok(None)
    } else {
        Err(ParseError::Malformed(error))
    }
}

/// `digits` as a decimal number no greater than `max`, written as the specification asks:
/// ASCII digits only, no sign, no leading zero.
fn decimal(digits: &[u8], max: u32) -> Option<u32> {
    let leading_zero = digits.len() > 1 && digits[0] == b'0';
    if digits.is_empty()
        || digits.len() > 5
        || leading_zero
        || !digits.iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let value = digits
        .iter()
        .fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
    (value <= max).then_some(value)
}

/// One v1 port: decimal, 0..=65535, no sign, no leading zero. `None` for a valid prefix
/// (every non-empty prefix of a valid port is itself one, so only emptiness differs).
fn v1_port(field: &[u8], whole: bool, error: &'static str) -> Result<Option<u16>, ParseError> {
    if !whole && field.is_empty() {
        return Ok(None);
    }
    let port = decimal(field, u32::from(u16::MAX)).ok_or(ParseError::Malformed(error))?;
    let port = u16::try_from(port).map_err(|_| ParseError::Malformed(error))?;
    Ok(whole.then_some(port))
}

/// v2: the 16 fixed bytes say everything but the addresses, so they are checked as soon
/// as they arrive; then wait for `16 + length` bytes.
fn parse_v2(buf: &[u8]) -> Result<Parsed, ParseError> {
    let Some(&version_command) = buf.get(V2_SIGNATURE.len()) else {
        return Ok(Parsed::Incomplete);
    };
    if version_command >> 4 != V2_VERSION {
        return Err(ParseError::Malformed("v2 version is not 2"));
    }
    let command = version_command & 0x0f;
    if command != V2_LOCAL && command != V2_PROXY {
        return Err(ParseError::Malformed(
            "v2 command is neither LOCAL nor PROXY",
        ));
    }
    let Some(&family_transport) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL (health checks): "discard the protocol block including the family".
    let needs = if command == V2_LOCAL {
        0
    } else {
        v2_address_length(family_transport)?
    };
    let Some(length_bytes) = buf.get(14..V2_FIXED_LENGTH) else {
        return Ok(Parsed::Incomplete);
    };
    let length = usize::from(u16::from_be_bytes([length_bytes[0], length_bytes[1]]));
    let total = V2_FIXED_LENGTH + length;
    if total > V2_MAX_LENGTH {
        return Err(ParseError::TooLong);
    }
    if length < needs {
        return Err(ParseError::Malformed(
            "v2 length is shorter than its address family needs",
        ));
    }
    let Some(block) = buf.get(V2_FIXED_LENGTH..total) else {
        return Ok(Parsed::Incomplete);
    };
    let header = match (command, family_transport) {
        (V2_PROXY, V2_TCP4) => {
            let address = |at: usize| {
                Ipv4Addr::from([block[at], block[at + 1], block[at + 2], block[at + 3]])
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Some(Header {
                source: SocketAddr::new(address(0).into(), port(8)),
                destination: SocketAddr::new(address(4).into(), port(10)),
            })
        }
        (V2_PROXY, V2_TCP6) => {
            let address = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            Some(Header {
                source: SocketAddr::new(address(0).into(), port(32)),
                destination: SocketAddr::new(address(16).into(), port(34)),
            })
        }
        // LOCAL, UNSPEC, UDP, UNIX: valid, but no TCP client address to use. Any bytes
        // after the addresses are TLVs, which sluice has no use for and skips.
        _ => None,
    };
    Ok(Parsed::Complete {
        header,
        length: total,
    })
}

/// The address block a v2 PROXY header's family and transport (byte 14) need. Values the
/// specification does not list "must be rejected as invalid by receivers".
fn v2_address_length(family_transport: u8) -> Result<usize, ParseError> {
    match family_transport {
        0x00 => Ok(0),          // UNSPEC
        0x11 | 0x12 => Ok(12),  // TCP, UDP over IPv4: 2 × 4 + 2 × 2
        0x21 | 0x22 => Ok(36),  // TCP, UDP over IPv6: 2 × 16 + 2 × 2
        0x31 | 0x32 => Ok(216), // UNIX stream, datagram: 2 × 108
        _ => Err(ParseError::Malformed(
            "v2 family or transport is not one the specification defines",
        )),
    }
}

/// The header for a client at `source` that connected to `destination`.
///
/// A header carries one family, so when the two differ (a dual-stack listener): an
/// IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is written as IPv4 where that makes both
/// match, else the IPv4 one is written as IPv4-mapped IPv6. Receivers then match the
/// client against IPv4 rules whenever it really is an IPv4 client.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = one_family(source, destination);
    match version {
        Version::V1 => encode_v1(source, destination),
        Version::V2 => encode_v2(source, destination),
    }
}

/// Writes the header for `source` → `destination` in one write, before any client byte.
pub async fn write_header<W: AsyncWrite + Unpin>(
    writer: &mut W,
    version: Version,
    source: SocketAddr,
    destination: SocketAddr,
) -> std::io::Result<()> {
    writer
        .write_all(&encode(version, source, destination))
        .await
}

/// Both addresses in one family, as [`encode`] describes.
fn one_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (source, destination) = (canonical(source), canonical(destination));
    if source.is_ipv4() == destination.is_ipv4() {
        return (source, destination);
    }
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    (v6(source), v6(destination))
}

fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let protocol = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {protocol} {} {} {} {}\r\n",
        v1_text(source.ip()),
        v1_text(destination.ip()),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// An address as v1 text. Rust writes IPv4-mapped IPv6 addresses with a dotted tail
/// (`::ffff:1.2.3.4`); the specification asks for hex groups only, so those are written
/// out group by group (`0:0:0:0:0:ffff:102:304`), which every parser reads.
fn v1_text(address: IpAddr) -> String {
    match address {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            let groups: Vec<String> = v6
                .segments()
                .iter()
                .map(|group| format!("{group:x}"))
                .collect();
            groups.join(":")
        }
        other => other.to_string(),
    }
}

fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(V2_FIXED_LENGTH + 36);
    out.extend_from_slice(V2_SIGNATURE);
    out.push(V2_VERSION << 4 | V2_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(V2_TCP4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(V2_TCP6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// Reads one header from a freshly accepted client within `timeout`, consuming exactly
/// the header's bytes and not one byte of the stream after it.
///
/// It peeks at what has arrived and parses it. A complete header is then read off the
/// socket (exactly its length; the rest stays queued for the relay). An incomplete one
/// is read off too, since [`parse`] only says `Incomplete` when every byte seen belongs
/// to the header, so the next peek blocks until more arrives: a header split over
/// several segments costs one peek and one read per segment, never a busy loop. At most
/// [`MAX_LENGTH`] bytes are buffered. Errors: timeout, EOF, I/O error, or a
/// [`ParseError`] (as soon as the bytes seen cannot be a header).
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<Header>, ReadError> {
    match tokio::time::timeout(timeout, read_header_untimed(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Timeout),
    }
}

async fn read_header_untimed(stream: &mut TcpStream) -> Result<Option<Header>, ReadError> {
    let mut buf = vec![0u8; MAX_LENGTH];
    // How many bytes of `buf` have been read off the socket (all of them header bytes).
    let mut consumed = 0;
    loop {
        // `parse` refuses anything longer than MAX_LENGTH before it is all consumed, so
        // there is always room to peek into; an empty peek buffer would read as EOF.
        debug_assert!(consumed < MAX_LENGTH);
        let peeked = stream.peek(&mut buf[consumed..]).await?;
        if peeked == 0 {
            return Err(ReadError::Closed);
        }
        let seen = consumed + peeked;
        match parse(&buf[..seen])? {
            Parsed::Complete { header, length } => {
                debug_assert!(consumed < length && length <= seen);
                // The same bytes again, this time off the queue; the stream's next byte
                // is the client's first.
                read_exact(stream, &mut buf[consumed..length]).await?;
                return Ok(header);
            }
            Parsed::Incomplete => {
                read_exact(stream, &mut buf[consumed..seen]).await?;
                consumed = seen;
            }
        }
    }
}

/// `read_exact` with EOF reported as [`ReadError::Closed`]. The bytes were peeked, so
/// this does not wait.
async fn read_exact(stream: &mut TcpStream, into: &mut [u8]) -> Result<(), ReadError> {
    match stream.read_exact(into).await {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => Err(ReadError::Closed),
        Err(error) => Err(ReadError::Io(error)),
    }
}

#[cfg(test)]
mod tests;
