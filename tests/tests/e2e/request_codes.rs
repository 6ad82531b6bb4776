//! The status codes of requests the transport refuses before the service
//! sees them (issue 16, item 12): a request over `limits.max_request_bytes`
//! is RESOURCE_EXHAUSTED (tonic said OUT_OF_RANGE), one that is not a
//! protobuf message INVALID_ARGUMENT (tonic said INTERNAL, which reads as
//! a node fault). The node serves on after both.

use fedq_engine::synth::Partner;
use fedq_pki::Role;
use fedq_proto::v1::QueryRequest;
use fedq_tests::{roomy_budget, TestFederation};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

/// Sends bytes as they are, as a message; reads nothing back.
#[derive(Clone, Copy)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, _src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        Ok(Some(()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// A channel to node 0 as analyst alice.
async fn channel(fed: &TestFederation) -> tonic::transport::Channel {
    let (cert, key) = fed.client_cert(Role::Analyst, "alice");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(fed.dir.path().join("ca/ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ))
        .domain_name(fed.nodes[0].name.clone());
    Endpoint::from_shared(format!("https://{}", fed.nodes[0].config.node.listen))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_undecodable_requests_get_the_caller_s_codes() {
    let fed = TestFederation::start(&[(Partner::Ngo, 500, 2)], roomy_budget()).await;
    let grpc = tonic::client::Grpc::new(channel(&fed).await);
    let query = PathAndQuery::from_static("/fedq.v1.Node/Query");
    let send = |bytes: Vec<u8>| {
        let query = query.clone();
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.unwrap();
            grpc.unary(tonic::Request::new(bytes), query, Raw)
                .await
                .unwrap_err()
        }
    };
    // Not a protobuf message: a field number 0 with wire type 7.
    let e = send(vec![0x07, 0xff, 0xff]).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a valid fedq.v1 message"), "{e:?}");
    // Larger than max_request_bytes (64 KiB by default).
    let e = send(vec![0u8; 200 * 1024]).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_request_bytes"), "{e:?}");
    // The node's own refusals keep their codes, and it serves on.
    let mut c = fed.raw_client(0, Role::Analyst, "alice").await;
    let e = c
        .query(QueryRequest {
            query_id: "bad sql".into(),
            sql: "SELECT".into(),
            epsilon: 0.5,
            dry_run: false,
            rho: 0.0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    c.query(QueryRequest {
        query_id: "fine".into(),
        sql: "SELECT COUNT(*) FROM cases".into(),
        epsilon: 0.5,
        dry_run: false,
        rho: 0.0,
    })
    .await
    .expect("serves on");
    drop(grpc);
}
