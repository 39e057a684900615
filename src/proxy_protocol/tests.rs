//! Tests of the PROXY protocol: bytes HAProxy really sends, every malformed shape, a real
//! loopback socket for `read_header`, and generated inputs (proptest) for the parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn header(source: &str, destination: &str) -> Option<Header> {
    Some(Header {
        source: addr(source),
        destination: addr(destination),
    })
}

fn complete(header: Option<Header>, length: usize) -> Result<Parsed, ParseError> {
    Ok(Parsed::Complete { header, length })
}

/// A v2 header: signature, `version_command`, `family_transport`, then `block` with its length.
fn v2(version_command: u8, family_transport: u8, block: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.push(version_command);
    out.push(family_transport);
    out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    out.extend_from_slice(block);
    out
}

/// Captured from HAProxy 2.6 (`server s1 ... send-proxy-v2`) for a client at
/// 127.0.0.2:47323 that connected to its frontend at 127.0.0.1:46905, followed by the
/// client's "hello".
const HAPROXY_V2: &[u8] =
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x7f\x00\x00\x02\x7f\x00\x00\x01\xb8\xdb\xb7\x39hello";

/// The same with `proxy-v2-options unique-id` (`unique-id-format abc123`): one TLV of type
/// 0x05 after the addresses. Client 127.0.0.2:49783, frontend 127.0.0.1:44207.
const HAPROXY_V2_UNIQUE_ID: &[u8] =
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x15\x7f\x00\x00\x02\x7f\x00\x00\x01\xc2\x77\xac\xaf\x05\x00\x06abc123hello";

/// HAProxy's `send-proxy` line for client 127.0.0.2:45107, frontend 127.0.0.1:44207.
const HAPROXY_V1: &[u8] = b"PROXY TCP4 127.0.0.2 127.0.0.1 45107 44207\r\nhello";

// ---------------------------------------------------------------------------------------
// Known bytes
// ---------------------------------------------------------------------------------------

#[test]
fn haproxy_v2_header_gives_the_client_address_and_leaves_its_bytes() {
    assert_eq!(
        parse(HAPROXY_V2),
        complete(header("127.0.0.2:47323", "127.0.0.1:46905"), 28)
    );
    assert_eq!(&HAPROXY_V2[28..], b"hello");
}

#[test]
fn haproxy_v2_header_with_a_tlv_is_skipped_past_the_tlv() {
    assert_eq!(
        parse(HAPROXY_V2_UNIQUE_ID),
        complete(header("127.0.0.2:49783", "127.0.0.1:44207"), 37)
    );
    assert_eq!(&HAPROXY_V2_UNIQUE_ID[37..], b"hello");
}

#[test]
fn haproxy_v1_line_gives_the_client_address() {
    assert_eq!(
        parse(HAPROXY_V1),
        complete(header("127.0.0.2:45107", "127.0.0.1:44207"), 44)
    );
}

#[test]
fn encode_writes_the_same_bytes_haproxy_does() {
    let (source, destination) = (addr("127.0.0.2:47323"), addr("127.0.0.1:46905"));
    assert_eq!(encode(Version::V2, source, destination), &HAPROXY_V2[..28]);
    let (source, destination) = (addr("127.0.0.2:45107"), addr("127.0.0.1:44207"));
    assert_eq!(encode(Version::V1, source, destination), &HAPROXY_V1[..44]);
}

#[test]
fn the_specifications_v1_example_parses() {
    let request = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n";
    assert_eq!(
        parse(request),
        complete(header("192.168.0.1:56324", "192.168.0.11:443"), 47)
    );
}

#[test]
fn v1_tcp6_in_its_textual_forms() {
    for (line, source, destination) in [
        (
            "PROXY TCP6 2001:db8::1 ::1 1 65535\r\n",
            "[2001:db8::1]:1",
            "[::1]:65535",
        ),
        (
            "PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 FFFF:ffff:ffff:ffff:ffff:ffff:ffff:ffff 0 0\r\n",
            "[2001:db8::1]:0",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:0",
        ),
        // inet_ntop writes mapped addresses this way; unambiguous, so accepted.
        (
            "PROXY TCP6 ::ffff:10.0.0.1 :: 80 443\r\n",
            "[::ffff:10.0.0.1]:80",
            "[::]:443",
        ),
    ] {
        assert_eq!(
            parse(line.as_bytes()),
            complete(header(source, destination), line.len()),
            "{line}"
        );
    }
}

#[test]
fn v1_unknown_means_use_the_real_peer() {
    assert_eq!(parse(b"PROXY UNKNOWN\r\nhello"), complete(None, 15));
    let long = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(long.len(), V1_MAX_LENGTH, "the specification's worst case");
    assert_eq!(parse(long), complete(None, 107));
    // "The receiver must ignore anything presented before the CRLF."
    assert_eq!(
        parse(b"PROXY UNKNOWN whatever \x01\xff\r\n"),
        complete(None, 27)
    );
}

#[test]
fn v1_longest_allowed_line_parses_and_one_byte_more_is_too_long() {
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LENGTH - 2, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(parse(&line), complete(None, 107));

    let mut longer = b"PROXY UNKNOWN ".to_vec();
    longer.resize(V1_MAX_LENGTH - 1, b'x');
    longer.extend_from_slice(b"\r\n");
    assert_eq!(parse(&longer), Err(ParseError::TooLong));
    // Without waiting for the CRLF: 107 bytes and no line end is already too long.
    assert_eq!(parse(&longer[..V1_MAX_LENGTH]), Err(ParseError::TooLong));
    assert_eq!(parse(&longer[..V1_MAX_LENGTH - 1]), Ok(Parsed::Incomplete));

    // TCP6 with dotted tails can be valid text and still too long.
    let dotted = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255 65535 65535\r\n";
    assert_eq!(parse(dotted), Err(ParseError::TooLong));
}

#[test]
fn v2_local_as_health_checks_send_it_means_use_the_real_peer() {
    assert_eq!(parse(&v2(0x20, 0x00, b"")), complete(None, 16));
    // LOCAL ignores the family, and the length must still be honoured.
    assert_eq!(parse(&v2(0x20, 0x11, &[7; 12])), complete(None, 28));
    assert_eq!(parse(&v2(0x20, 0xff, &[7; 3])), complete(None, 19));
}

#[test]
fn v2_families_without_a_tcp_address_mean_use_the_real_peer() {
    for (family, block_length) in [
        (0x00, 0),
        (0x00, 9),
        (0x12, 12),
        (0x22, 36),
        (0x31, 216),
        (0x32, 220),
    ] {
        let bytes = v2(0x21, family, &vec![1; block_length]);
        assert_eq!(
            parse(&bytes),
            complete(None, 16 + block_length),
            "family {family:#04x}"
        );
    }
}

#[test]
fn v2_tcp6_and_trailing_tlvs() {
    let mut block = Vec::new();
    block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
    block.extend_from_slice(&"fe80::1".parse::<Ipv6Addr>().unwrap().octets());
    block.extend_from_slice(&443u16.to_be_bytes());
    block.extend_from_slice(&8443u16.to_be_bytes());
    block.extend_from_slice(b"\x02\x00\x0bexample.com\x04\x00\x00");
    let bytes = v2(0x21, 0x21, &block);
    assert_eq!(
        parse(&bytes),
        complete(header("[2001:db8::7]:443", "[fe80::1]:8443"), bytes.len())
    );
}

#[test]
fn v2_longest_accepted_header_parses_and_longer_is_refused_from_its_16_bytes() {
    let mut block = vec![0u8; 2048];
    block[..12].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 1, 187]);
    let bytes = v2(0x21, 0x11, &block);
    assert_eq!(bytes.len(), V2_MAX_LENGTH);
    assert_eq!(
        parse(&bytes),
        complete(header("10.0.0.1:80", "10.0.0.2:443"), 2064)
    );

    let too_long = v2(0x21, 0x11, &vec![0; 2049]);
    assert_eq!(parse(&too_long), Err(ParseError::TooLong));
    assert_eq!(
        parse(&too_long[..16]),
        Err(ParseError::TooLong),
        "no need to wait for the body"
    );
    assert_eq!(
        parse(&v2(0x20, 0x00, &vec![0; 65535])[..16]),
        Err(ParseError::TooLong)
    );
}

#[test]
fn round_trips_in_both_versions_and_both_families() {
    for (source, destination) in [
        ("192.0.2.10:51000", "198.51.100.1:443"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::10]:51000", "[2001:db8::1]:443"),
        ("[::]:0", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
    ] {
        for version in [Version::V1, Version::V2] {
            let bytes = encode(version, addr(source), addr(destination));
            assert_eq!(
                parse(&bytes),
                complete(header(source, destination), bytes.len()),
                "{version:?} {source} {destination}"
            );
        }
    }
}

#[test]
fn encode_puts_mixed_families_in_one() {
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: they go out as IPv4.
    for version in [Version::V1, Version::V2] {
        let bytes = encode(
            version,
            addr("[::ffff:192.0.2.1]:5000"),
            addr("10.0.0.1:80"),
        );
        assert_eq!(
            parse(&bytes),
            complete(header("192.0.2.1:5000", "10.0.0.1:80"), bytes.len())
        );
        let bytes = encode(
            version,
            addr("[::ffff:192.0.2.1]:5000"),
            addr("[::ffff:10.0.0.1]:80"),
        );
        assert_eq!(
            parse(&bytes),
            complete(header("192.0.2.1:5000", "10.0.0.1:80"), bytes.len())
        );
        // A real IPv6 on one side: the IPv4 side is written IPv4-mapped.
        let bytes = encode(version, addr("192.0.2.1:5000"), addr("[2001:db8::1]:80"));
        assert_eq!(
            parse(&bytes),
            complete(
                header("[::ffff:192.0.2.1]:5000", "[2001:db8::1]:80"),
                bytes.len()
            )
        );
    }
    assert_eq!(
        encode(
            Version::V1,
            addr("192.0.2.1:5000"),
            addr("[2001:db8::1]:80")
        ),
        b"PROXY TCP6 0:0:0:0:0:ffff:c000:201 2001:db8::1 5000 80\r\n",
        "hex groups only, as the specification writes IPv6"
    );
}

#[test]
fn version_reads_from_config_as_v1_and_v2() {
    #[derive(serde::Deserialize)]
    struct Service {
        send_proxy: Version,
    }
    let v1: Service = toml::from_str(r#"send_proxy = "v1""#).unwrap();
    let v2: Service = toml::from_str(r#"send_proxy = "v2""#).unwrap();
    assert_eq!((v1.send_proxy, v2.send_proxy), (Version::V1, Version::V2));
    assert!(toml::from_str::<Service>(r#"send_proxy = "v3""#).is_err());
}

// ---------------------------------------------------------------------------------------
// What is refused
// ---------------------------------------------------------------------------------------

#[test]
fn other_protocols_are_not_proxy_from_their_first_wrong_byte() {
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", // a TLS ClientHello
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROX\n",
        b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c",
        b"\r\n\r\n\x01",
        b"\0",
        b"X",
    ] {
        assert_eq!(
            parse(bytes),
            Err(ParseError::NotProxy),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn nothing_yet_or_a_signatures_prefix_waits_for_more() {
    for bytes in [
        &b""[..],
        b"P",
        b"PROXY",
        b"PROXY ",
        b"PROXY TCP",
        b"\r",
        b"\r\n\r\n\0\r\nQUIT",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00",
    ] {
        assert_eq!(parse(bytes), Ok(Parsed::Incomplete), "{bytes:?}");
    }
}

#[test]
fn every_malformed_v1_shape_is_refused() {
    let cases: &[&[u8]] = &[
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n",     // LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\rX",    // CR without LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r\n", // stray CR
        b"PROXY TCP4 1.2.3.4  5.6.7.8 80 443\r\n",  // two spaces
        b"PROXY  TCP4 1.2.3.4 5.6.7.8 80 443\r\n",  // two spaces after PROXY
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 \r\n",  // trailing space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 9\r\n", // a sixth field
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n",       // a missing port
        b"PROXY TCP4 1.2.3.4 5.6.7.8\r\n",          // no ports
        b"PROXY TCP4\r\n",                          // nothing
        b"PROXY \r\n",                              // not even a protocol
        b"PROXY TCP4 1.2.3.4\t5.6.7.8 80 443\r\n",  // a tab
        b"PROXY TCP5 1.2.3.4 5.6.7.8 80 443\r\n",   // unknown protocol
        b"PROXY tcp4 1.2.3.4 5.6.7.8 80 443\r\n",   // lower case
        b"PROXY UDP4 1.2.3.4 5.6.7.8 80 443\r\n",   // not in v1
        b"PROXY UNKNOWNX\r\n",                      // not UNKNOWN
        b"PROXY UNKNOWN\n",                         // LF without CR
        b"PROXY TCP4 01.2.3.4 5.6.7.8 80 443\r\n",  // leading zero (octal?)
        b"PROXY TCP4 1.2.3.256 5.6.7.8 80 443\r\n", // octet out of range
        b"PROXY TCP4 1.2.3 5.6.7.8 80 443\r\n",     // three octets
        b"PROXY TCP4 1.2.3.4. 5.6.7.8 80 443\r\n",  // trailing dot
        b"PROXY TCP4 ::1 5.6.7.8 80 443\r\n",       // IPv6 under TCP4
        b"PROXY TCP6 ::1 5.6.7.8 80 443\r\n",       // IPv4 under TCP6
        b"PROXY TCP6 1.2.3.4 ::1 80 443\r\n",       // IPv4 under TCP6
        b"PROXY TCP6 [::1] ::1 80 443\r\n",         // brackets
        b"PROXY TCP6 fe80::1%eth0 ::1 80 443\r\n",  // a zone
        b"PROXY TCP6 1::2::3 ::1 80 443\r\n",       // two ::
        b"PROXY TCP6 1:2:3:4:5:6:7 ::1 80 443\r\n", // 112 bits
        b"PROXY TCP6 00001:: ::1 80 443\r\n",       // a five-digit group
        b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n",  // leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 00 443\r\n",   // leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n",  // a sign
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 443\r\n",   // negative
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n", // too big
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", // too big
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443x\r\n",  // not a number
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 0x1bb\r\n", // hex
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 \r\n",      // empty port
        b"PROXY TCP4 1.2.3.\xc4\xb0 5.6.7.8 80 443\r\n", // not ASCII
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\0\r\n", // a NUL
    ];
    for bytes in cases {
        let result = parse(bytes);
        assert!(
            matches!(result, Err(ParseError::Malformed(_))),
            "{:?} gave {result:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

#[test]
fn malformed_v1_is_refused_before_its_line_ends() {
    // A client that is not speaking the protocol is refused at its first wrong byte,
    // not after the timeout.
    for bytes in [
        &b"PROXY TCP4 1.2.3.x"[..],
        b"PROXY TCP4 1.2.3.4  ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 ",
        b"PROXY TCP4 1234.",
        b"PROXY TCP6 ::g",
        b"PROXY TCX",
        b"PROXY UNKNOWNZ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536",
    ] {
        assert!(
            matches!(parse(bytes), Err(ParseError::Malformed(_))),
            "{:?} gave {:?}",
            String::from_utf8_lossy(bytes),
            parse(bytes)
        );
    }
}

#[test]
fn every_malformed_v2_shape_is_refused() {
    let tcp4 = [1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 1, 187];
    let cases = [
        (v2(0x11, 0x11, &tcp4), "version 1"),
        (v2(0x31, 0x11, &tcp4), "version 3"),
        (v2(0x01, 0x11, &tcp4), "version 0"),
        (v2(0x22, 0x11, &tcp4), "command 2"),
        (v2(0x2f, 0x11, &tcp4), "command 15"),
        (v2(0x21, 0x41, &tcp4), "family 4"),
        (v2(0x21, 0xf1, &tcp4), "family 15"),
        (v2(0x21, 0x13, &tcp4), "transport 3"),
        (v2(0x21, 0x10, &tcp4), "IPv4 with no transport"),
        (v2(0x21, 0x01, &tcp4), "no family with STREAM"),
        (v2(0x21, 0x11, &tcp4[..11]), "TCP4 block one byte short"),
        (v2(0x21, 0x11, b""), "TCP4 without addresses"),
        (v2(0x21, 0x21, &[0; 35]), "TCP6 block one byte short"),
        (v2(0x21, 0x12, &[0; 11]), "UDP4 block one byte short"),
        (v2(0x21, 0x31, &[0; 215]), "UNIX block one byte short"),
    ];
    for (bytes, what) in cases {
        let result = parse(&bytes);
        assert!(
            matches!(result, Err(ParseError::Malformed(_))),
            "{what}: {result:?}"
        );
        // Refused from the fixed 16 bytes, without waiting for the block.
        let result = parse(&bytes[..16]);
        assert!(
            matches!(result, Err(ParseError::Malformed(_))),
            "{what} (16 bytes): {result:?}"
        );
    }
}

#[test]
fn errors_say_what_was_wrong() {
    let error = parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 80 65536\r\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "malformed PROXY protocol header: v1 destination port is not a decimal in 0..=65535"
    );
    assert_eq!(error.as_label(), "malformed");
    assert_eq!(ReadError::Timeout.as_label(), "timeout");
    assert_eq!(ReadError::Parse(ParseError::TooLong).as_label(), "too_long");
}

// ---------------------------------------------------------------------------------------
// read_header on real sockets
// ---------------------------------------------------------------------------------------

/// A connected pair on loopback: (the client's end, the accepted end).
async fn connected() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    client.set_nodelay(true).unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    (client, accepted)
}

/// A payload a user would notice being cut: 64 KiB that do not repeat every few bytes.
fn payload() -> Vec<u8> {
    (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect()
}

/// The client's bytes that reach the relay after the header: everything up to EOF.
async fn rest_of(mut accepted: TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    accepted.read_to_end(&mut rest).await.unwrap();
    rest
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn header_and_payload_in_one_write_leave_the_payload_for_the_relay() {
    let (source, destination) = (addr("203.0.113.7:40000"), addr("198.51.100.2:443"));
    let headers = [
        encode(Version::V1, source, destination),
        encode(Version::V2, source, destination),
        HAPROXY_V2_UNIQUE_ID[..37].to_vec(),
    ];
    for header_bytes in headers {
        let expected = header_of(&header_bytes);
        let (mut client, mut accepted) = connected().await;
        let mut bytes = header_bytes.clone();
        bytes.extend_from_slice(&payload());
        client.write_all(&bytes).await.unwrap();
        client.shutdown().await.unwrap();

        assert_eq!(read_header(&mut accepted, LONG).await.unwrap(), expected);
        assert!(
            rest_of(accepted).await == payload(),
            "the payload arrived intact"
        );
    }
}

#[tokio::test]
async fn a_payload_that_looks_like_a_header_is_left_alone() {
    let (mut client, mut accepted) = connected().await;
    let mut bytes = encode(Version::V1, addr("10.0.0.1:1"), addr("10.0.0.2:2"));
    bytes.extend_from_slice(b"PROXY TCP4 6.6.6.6 6.6.6.6 6 6\r\n");
    client.write_all(&bytes).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(
        read_header(&mut accepted, LONG).await.unwrap(),
        header("10.0.0.1:1", "10.0.0.2:2")
    );
    assert_eq!(
        rest_of(accepted).await,
        b"PROXY TCP4 6.6.6.6 6.6.6.6 6 6\r\n"
    );
}

/// Writes `bytes` in the pieces `cuts` make, 20 ms apart, then closes.
async fn write_in_pieces(mut client: TcpStream, bytes: Vec<u8>, cuts: Vec<usize>) {
    let mut from = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        client.write_all(&bytes[from..cut]).await.unwrap();
        client.flush().await.unwrap();
        from = cut;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_header_split_over_several_writes_is_reassembled() {
    let (source, destination) = (addr("[2001:db8::5]:1234"), addr("[2001:db8::1]:443"));
    for version in [Version::V1, Version::V2] {
        let header_bytes = encode(version, source, destination);
        let n = header_bytes.len();
        // Inside the signature, at the fixed part's end, inside the addresses, and with
        // the last header byte sent together with the payload.
        let cut_sets = [vec![3, 14, 16, 20, n - 1], (1..n).collect::<Vec<_>>()];
        for cuts in cut_sets {
            let (client, mut accepted) = connected().await;
            let mut bytes = header_bytes.clone();
            bytes.extend_from_slice(b"after the header");
            let writer = tokio::spawn(write_in_pieces(client, bytes, cuts));
            assert_eq!(
                read_header(&mut accepted, LONG).await.unwrap(),
                Some(Header {
                    source,
                    destination
                }),
                "{version:?}"
            );
            assert_eq!(rest_of(accepted).await, b"after the header");
            writer.await.unwrap();
        }
    }
}

/// CPU time this thread has used (the test's runtime is on this thread).
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[tokio::test]
async fn waiting_for_the_rest_of_a_split_header_burns_no_cpu() {
    // Peeking again at bytes already seen returns at once: a reader that did that would
    // spin for the whole pause. This one consumes them and sleeps until more arrive.
    let (mut client, mut accepted) = connected().await;
    let pause = Duration::from_millis(300);
    let writer = tokio::spawn(async move {
        for piece in [&HAPROXY_V2[..8], &HAPROXY_V2[8..20], &HAPROXY_V2[20..]] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(pause).await;
        }
        client.shutdown().await.unwrap();
    });
    let cpu_before = thread_cpu_time();
    let header = read_header(&mut accepted, LONG).await.unwrap();
    let cpu = thread_cpu_time() - cpu_before;
    assert_eq!(header, header_of(HAPROXY_V2));
    assert!(
        cpu < pause / 2,
        "{cpu:?} of CPU while waiting 2 × {pause:?} for the header"
    );
    assert_eq!(rest_of(accepted).await, b"hello");
    writer.await.unwrap();
}

/// The header `bytes` start with.
fn header_of(bytes: &[u8]) -> Option<Header> {
    match parse(bytes) {
        Ok(Parsed::Complete { header, .. }) => header,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_silent_client_times_out() {
    let (_client, mut accepted) = connected().await;
    let started = Instant::now();
    let result = read_header(&mut accepted, Duration::from_millis(200)).await;
    assert!(matches!(result, Err(ReadError::Timeout)), "{result:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn a_client_that_stops_half_way_through_the_header_times_out() {
    let (mut client, mut accepted) = connected().await;
    client.write_all(&HAPROXY_V2[..20]).await.unwrap();
    let result = read_header(&mut accepted, Duration::from_millis(200)).await;
    assert!(matches!(result, Err(ReadError::Timeout)), "{result:?}");
}

#[tokio::test]
async fn a_client_that_closes_before_the_header_ends_is_closed() {
    for sent in [
        &b""[..],
        b"PROXY TCP4 1.2",
        &HAPROXY_V2[..10],
        &HAPROXY_V2[..20],
    ] {
        let (mut client, mut accepted) = connected().await;
        client.write_all(sent).await.unwrap();
        client.shutdown().await.unwrap();
        let result = read_header(&mut accepted, LONG).await;
        assert!(
            matches!(result, Err(ReadError::Closed)),
            "{sent:?}: {result:?}"
        );
    }
}

#[tokio::test]
async fn an_oversized_v2_header_is_refused_without_waiting_for_it() {
    let (mut client, mut accepted) = connected().await;
    // Announces 4096 bytes and sends only the fixed part, keeping the connection open:
    // waiting for the rest would end in Timeout, not TooLong.
    let announced = v2(0x21, 0x11, &[0; 4096]);
    client.write_all(&announced[..16]).await.unwrap();
    let result = read_header(&mut accepted, LONG).await;
    assert!(
        matches!(result, Err(ReadError::Parse(ParseError::TooLong))),
        "{result:?}"
    );
}

#[tokio::test]
async fn garbage_is_refused_at_once() {
    for garbage in [
        &b"GET / HTTP/1.1\r\n"[..],
        b"PROXY TCP4 1.2.3.x",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x13",
        b"PROXY UNKNOWN and more and more and more and more and more and more and more and more and more and more and more",
    ] {
        let (mut client, mut accepted) = connected().await;
        client.write_all(garbage).await.unwrap();
        // The client stays connected: only a decision from the bytes ends this early.
        let result = read_header(&mut accepted, LONG).await;
        assert!(matches!(result, Err(ReadError::Parse(_))), "{garbage:?}: {result:?}");
    }
}

#[tokio::test]
async fn write_header_sends_what_read_header_reads() {
    let (mut client, mut accepted) = connected().await;
    let (source, destination) = (addr("192.0.2.99:6000"), addr("192.0.2.1:80"));
    write_header(&mut client, Version::V2, source, destination)
        .await
        .unwrap();
    client.write_all(b"first byte").await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(
        read_header(&mut accepted, LONG).await.unwrap(),
        Some(Header {
            source,
            destination
        })
    );
    assert_eq!(rest_of(accepted).await, b"first byte");
}

// ---------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------

fn any_ipv4() -> impl Strategy<Value = IpAddr> {
    any::<[u8; 4]>().prop_map(|octets| IpAddr::V4(Ipv4Addr::from(octets)))
}

fn any_ipv6() -> impl Strategy<Value = IpAddr> {
    // Half of them near the IPv4-mapped and all-zero ranges, where text forms differ most.
    prop_oneof![
        any::<[u8; 16]>().prop_map(|octets| IpAddr::V6(Ipv6Addr::from(octets))),
        (any::<[u8; 4]>(), 0..3u8).prop_map(|(v4, kind)| {
            let v4 = Ipv4Addr::from(v4);
            IpAddr::V6(match kind {
                0 => v4.to_ipv6_mapped(),
                1 => v4.to_ipv6_compatible(),
                _ => Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, u16::from(v4.octets()[3])),
            })
        }),
    ]
}

fn any_address() -> impl Strategy<Value = SocketAddr> {
    (prop_oneof![any_ipv4(), any_ipv6()], any::<u16>())
        .prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// A pair of addresses of one family, as a header can carry them unchanged.
fn same_family_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    let v4 = (any_ipv4(), any::<u16>(), any_ipv4(), any::<u16>());
    let v6 = (any_ipv6(), any::<u16>(), any_ipv6(), any::<u16>());
    prop_oneof![v4, v6].prop_map(|(s, sp, d, dp)| (SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
}

/// An IPv6 address as v1 text in one of the forms senders write.
fn ipv6_text(ip: Ipv6Addr, form: u8) -> String {
    let groups = ip.segments();
    match form {
        0 => ip.to_string(),
        1 => groups
            .iter()
            .map(|g| format!("{g:x}"))
            .collect::<Vec<_>>()
            .join(":"),
        2 => groups
            .iter()
            .map(|g| format!("{g:04X}"))
            .collect::<Vec<_>>()
            .join(":"),
        _ => ip.to_string().to_uppercase(),
    }
}

/// Valid headers of every kind sluice accepts, with the header each must parse to.
fn valid_header() -> impl Strategy<Value = (Vec<u8>, Option<Header>)> {
    let encoded = (
        prop_oneof![Just(Version::V1), Just(Version::V2)],
        same_family_pair(),
    )
        .prop_map(|(version, (s, d))| {
            let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let expected = if s.ip().to_canonical().is_ipv4() == d.ip().to_canonical().is_ipv4() {
                Header {
                    source: canonical(s),
                    destination: canonical(d),
                }
            } else {
                Header {
                    source: s,
                    destination: d,
                }
            };
            (encode(version, s, d), Some(expected))
        });
    let v1_tcp6_text = (any_ipv6(), any_ipv6(), any::<u16>(), any::<u16>(), 0..4u8)
        .prop_filter_map("within 107 bytes", |(s, d, sp, dp, form)| {
            let (IpAddr::V6(s6), IpAddr::V6(d6)) = (s, d) else {
                return None;
            };
            let line = format!(
                "PROXY TCP6 {} {} {sp} {dp}\r\n",
                ipv6_text(s6, form),
                ipv6_text(d6, form)
            );
            let header = Header {
                source: SocketAddr::new(s, sp),
                destination: SocketAddr::new(d, dp),
            };
            (line.len() <= V1_MAX_LENGTH).then(|| (line.into_bytes(), Some(header)))
        });
    let v1_unknown = proptest::collection::vec(
        any::<u8>().prop_filter("no CR, LF", |b| *b != b'\r' && *b != b'\n'),
        0..=91,
    )
    .prop_map(|rest| {
        let mut line = b"PROXY UNKNOWN".to_vec();
        if !rest.is_empty() {
            line.push(b' ');
            line.extend_from_slice(&rest);
        }
        line.extend_from_slice(b"\r\n");
        (line, None)
    });
    let v2_local = (
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..=2048),
    )
        .prop_map(|(family, block)| (v2(0x20, family, &block), None));
    let v2_no_address = (
        prop::sample::select(vec![
            (0x00u8, 0usize),
            (0x12, 12),
            (0x22, 36),
            (0x31, 216),
            (0x32, 216),
        ]),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|((family, needs), extra)| {
            let mut block = vec![0x5a; needs];
            block.extend_from_slice(&extra);
            (v2(0x21, family, &block), None)
        });
    let v2_with_tlvs = (
        same_family_pair(),
        proptest::collection::vec(any::<u8>(), 0..=2012),
    )
        .prop_map(|((s, d), tlvs)| {
            let mut bytes = encode(Version::V2, s, d);
            let block_length = bytes.len() - 16 + tlvs.len();
            if block_length > 2048 {
                bytes.truncate(16);
                return (v2(0x20, 0x00, &[]), None);
            }
            bytes[14..16].copy_from_slice(&u16::try_from(block_length).unwrap().to_be_bytes());
            bytes.extend_from_slice(&tlvs);
            let expected = header_of(&encode(Version::V2, s, d));
            (bytes, expected)
        });
    prop_oneof![
        3 => encoded,
        1 => v1_tcp6_text,
        1 => v1_unknown,
        1 => v2_local,
        1 => v2_no_address,
        2 => v2_with_tlvs,
    ]
}

/// Bytes that reach deep into the parser: a header's opening, then bytes drawn mostly from
/// the characters headers are made of.
fn header_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    let openings: Vec<&[u8]> = vec![
        b"",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN",
        b"PROXY TCP4 192.168.0.1 10.0.0.1 ",
        b"PROXY TCP6 ::1 ::2 80 ",
        b"\r\n\r\n\0\r\nQUIT\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00",
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00",
    ];
    let alphabet = b"0123456789abcdefABCDEF.:: \r\nTCP46UNKOWPRXY".to_vec();
    let byte = prop_oneof![any::<u8>(), prop::sample::select(alphabet)];
    (
        prop::sample::select(openings),
        proptest::collection::vec(byte, 0..160),
    )
        .prop_map(|(opening, rest)| {
            let mut bytes = opening.to_vec();
            bytes.extend_from_slice(&rest);
            bytes
        })
}

/// A valid header with a few bytes replaced, inserted or removed, and something after it.
fn mutated_header() -> impl Strategy<Value = Vec<u8>> {
    let edit = (0..3u8, any::<prop::sample::Index>(), any::<u8>());
    (
        valid_header(),
        proptest::collection::vec(edit, 1..4),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|((mut bytes, _), edits, tail)| {
            for (kind, at, byte) in edits {
                let at = at.index(bytes.len().max(1));
                match kind {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at.min(bytes.len()), byte),
                    _ if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            bytes.extend_from_slice(&tail);
            bytes
        })
}

/// What every answer must satisfy, whatever the input: a complete header is within the
/// buffer, parses the same on its own, and every shorter prefix of it is incomplete.
fn check_answer(bytes: &[u8]) -> Result<(), TestCaseError> {
    let answer = parse(bytes);
    if let Ok(Parsed::Complete { length, .. }) = answer {
        prop_assert!(length <= bytes.len(), "length {length} > {}", bytes.len());
        prop_assert!(length > 0);
        prop_assert_eq!(
            parse(&bytes[..length]),
            answer,
            "a header ends where it says"
        );
        for cut in 0..length {
            prop_assert_eq!(
                parse(&bytes[..cut]),
                Ok(Parsed::Incomplete),
                "cut at {}",
                cut
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (1) Any bytes: a header within the buffer, Incomplete, or an error; never a panic.
    #[test]
    fn any_bytes_give_a_clean_answer(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_answer(&bytes)?;
    }

    /// (1) The same for bytes built to get past the signatures.
    #[test]
    fn header_like_bytes_give_a_clean_answer(bytes in header_like_bytes()) {
        check_answer(&bytes)?;
    }

    /// (1) And for valid headers with a few bytes changed.
    #[test]
    fn damaged_headers_give_a_clean_answer(bytes in mutated_header()) {
        check_answer(&bytes)?;
    }

    /// (2) A valid header followed by anything parses to its header, and its length.
    #[test]
    fn a_valid_header_is_read_whatever_follows(
        (header_bytes, expected) in valid_header(),
        after in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = header_bytes.clone();
        bytes.extend_from_slice(&after);
        prop_assert_eq!(
            parse(&bytes),
            Ok(Parsed::Complete { header: expected, length: header_bytes.len() })
        );
    }

    /// (3) Every strict prefix of a valid header is Incomplete. A header's prefix always
    /// agrees with a signature on the bytes it has (the empty one with both), so it can
    /// still start a header: NotProxy is never the answer for one, nor an early error.
    #[test]
    fn every_prefix_of_a_valid_header_waits_for_more((header_bytes, _) in valid_header()) {
        for cut in 0..header_bytes.len() {
            prop_assert_eq!(parse(&header_bytes[..cut]), Ok(Parsed::Incomplete), "cut at {}", cut);
        }
    }

    /// encode → parse gives back the addresses, in one family (IPv4 where both can be).
    #[test]
    fn encode_then_parse_gives_back_the_addresses(
        version in prop_oneof![Just(Version::V1), Just(Version::V2)],
        source in any_address(),
        destination in any_address(),
    ) {
        let bytes = encode(version, source, destination);
        let Ok(Parsed::Complete { header: Some(header), length }) = parse(&bytes) else {
            return Err(TestCaseError::fail(format!("{:?}", parse(&bytes))));
        };
        prop_assert_eq!(length, bytes.len());
        prop_assert_eq!(header.source.is_ipv4(), header.destination.is_ipv4());
        prop_assert_eq!(header.source.port(), source.port());
        prop_assert_eq!(header.destination.port(), destination.port());
        prop_assert_eq!(header.source.ip().to_canonical(), source.ip().to_canonical());
        prop_assert_eq!(header.destination.ip().to_canonical(), destination.ip().to_canonical());
    }
}
