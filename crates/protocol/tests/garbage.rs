//! Every decoder fed random and mutated bytes: errors are fine, panics are
//! not. A cheap stand-in for a fuzzer that runs on every `cargo test`.

use bytes::{Bytes, BytesMut};
use dsql_proxy_protocol::relay::BoundaryTracker;
use dsql_proxy_protocol::scram::{ScramClient, ScramServer, ScramVerifier};
use dsql_proxy_protocol::{backend, frame, frontend, startup, RawMessage};
use rand::{Rng, RngCore, SeedableRng};

fn inputs(seed: u64, count: usize) -> impl Iterator<Item = Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let valid: Vec<Vec<u8>> = vec![
        b"\0\x03\0\0user\0app\0database\0db\0\0".to_vec(),
        b"\x04\xd2\x16\x2f".to_vec(),
        b"\x04\xd2\x16\x2e\0\0\0\x07\x01\x02\x03\x04".to_vec(),
        b"\0\0\0\x0aSCRAM-SHA-256\0\0".to_vec(),
        b"SFATAL\0C28P01\0Mbad\0\0".to_vec(),
        b"SCRAM-SHA-256\0\0\0\0\x03abc".to_vec(),
    ];
    (0..count).map(move |i| {
        if i % 2 == 0 {
            let len = rng.gen_range(0..64);
            let mut v = vec![0u8; len];
            rng.fill_bytes(&mut v);
            v
        } else {
            // Mutate a valid message: flip, truncate or extend.
            let mut v = valid[i % valid.len()].clone();
            for _ in 0..rng.gen_range(1..4) {
                match rng.gen_range(0..3) {
                    0 if !v.is_empty() => {
                        let at = rng.gen_range(0..v.len());
                        v[at] = rng.gen();
                    }
                    1 => v.truncate(rng.gen_range(0..=v.len())),
                    _ => v.push(rng.gen()),
                }
            }
            v
        }
    })
}

#[test]
fn decoders_never_panic() {
    let verifier = ScramVerifier::from_password("pw", 16);
    let (client, _) = ScramClient::start("pw");
    for input in inputs(7, 200_000) {
        let _ = startup::parse_initial_packet(&input);
        if input.len() >= 4 {
            let _ = startup::packet_body_len([input[0], input[1], input[2], input[3]]);
        }
        let mut buf = BytesMut::from(&input[..]);
        while let Ok(Some(_)) = frame::split_message(&mut buf, 1024) {}
        for tag in [b'R', b'S', b'K', b'Z', b'E', b'N', b'v', b'p'] {
            let raw = RawMessage {
                tag,
                body: Bytes::copy_from_slice(&input),
            };
            let _ = backend::decode(&raw);
            let _ = frontend::decode_password(&raw);
            let _ = frontend::decode_sasl_initial(&raw);
        }
        let mut tracker = BoundaryTracker::default();
        tracker.observe(&input);
        let _ = tracker.at_boundary();
        let _ = ScramServer::start(&verifier, &input);
        if let Ok((server, _)) = ScramServer::start(&verifier, b"n,,n=,r=abc") {
            let _ = server.finish(&input);
        }
        let _ = client.parse_server_first(&input);
        let _ = client.verify_server_final(&input);
        let _ = ScramVerifier::parse(&String::from_utf8_lossy(&input));
    }
}
