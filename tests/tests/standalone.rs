//! `quire standalone` end to end: the gRPC ledger API over an embedded metadata store and three
//! bookies in one process; data survives kill -9 and a restart; bad input gets typed errors;
//! the README's Python example runs against it.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use quire_proto::ledger as pb;
use quire_proto::ledger::ledger_service_client::LedgerServiceClient;
use quire_tests::{RPC_TIMEOUT, StandaloneProcess};
use tonic::transport::Channel;
use tonic::{Code, Status};

type Api = LedgerServiceClient<Channel>;

const PASSWORD: &[u8] = b"pw";

async fn timed<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(RPC_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
}

/// Asserts the gRPC code and the `x-quire-ledger-code` of a failure.
#[track_caller]
fn assert_code(s: &Status, grpc: Code, ledger: &str) {
    let got = s
        .metadata()
        .get("x-quire-ledger-code")
        .and_then(|v| v.to_str().ok());
    assert_eq!(
        (s.code(), got),
        (grpc, Some(ledger)),
        "unexpected status: {s:?}"
    );
}

async fn create(api: &mut Api, e: u32, qw: u32, qa: u32) -> Result<u64, Status> {
    let req = pb::CreateRequest {
        ensemble_size: e,
        write_quorum: qw,
        ack_quorum: qa,
        digest: pb::DigestType::Crc32c as i32,
        password: Bytes::from_static(PASSWORD),
        custom: HashMap::from([("test".to_string(), "standalone".to_string())]),
    };
    timed("create", api.create(req))
        .await
        .map(|r| r.into_inner().ledger_id)
}

/// Sends the requests on one append stream (then half-closes it) and collects the acknowledged
/// ids; on failure, the ids acknowledged before it and the status.
async fn append_requests(
    api: &mut Api,
    reqs: Vec<pb::AppendRequest>,
) -> Result<Vec<u64>, (Vec<u64>, Status)> {
    let mut ids = Vec::new();
    let resp = match timed("append", api.append(tokio_stream::iter(reqs))).await {
        Ok(r) => r,
        Err(s) => return Err((ids, s)),
    };
    let mut stream = resp.into_inner();
    loop {
        match timed("append response", stream.message()).await {
            Ok(Some(m)) => ids.extend(m.entry_ids),
            Ok(None) => return Ok(ids),
            Err(s) => return Err((ids, s)),
        }
    }
}

/// Appends `payloads` to `ledger`, `per_request` payloads per request.
async fn append(
    api: &mut Api,
    ledger: u64,
    payloads: &[Bytes],
    per_request: usize,
) -> Result<Vec<u64>, (Vec<u64>, Status)> {
    let reqs = payloads
        .chunks(per_request)
        .enumerate()
        .map(|(i, chunk)| pb::AppendRequest {
            ledger_id: if i == 0 { ledger } else { 0 },
            password: Bytes::from_static(if i == 0 { PASSWORD } else { b"" }),
            payloads: chunk.to_vec(),
        })
        .collect();
    append_requests(api, reqs).await
}

async fn close(api: &mut Api, ledger: u64) -> Result<pb::LedgerInfo, Status> {
    let req = pb::CloseRequest {
        ledger_id: ledger,
        password: Bytes::from_static(PASSWORD),
    };
    timed("close", api.close(req))
        .await
        .map(|r| r.into_inner().info.expect("close returns the metadata"))
}

async fn collect(
    stream: Result<tonic::Response<tonic::Streaming<pb::ReadResponse>>, Status>,
) -> Result<Vec<pb::Entry>, Status> {
    let mut stream = stream?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = timed("read response", stream.message()).await? {
        out.extend(m.entries);
    }
    Ok(out)
}

async fn read(
    api: &mut Api,
    ledger: u64,
    first: u64,
    last: i64,
    unconfirmed: bool,
) -> Result<Vec<pb::Entry>, Status> {
    let req = pb::ReadRequest {
        ledger_id: ledger,
        password: Bytes::from_static(PASSWORD),
        first_entry: first,
        last_entry: last,
        unconfirmed,
    };
    collect(timed("read", api.read(req)).await).await
}

async fn info(api: &mut Api, ledger: u64) -> Result<pb::LedgerInfo, Status> {
    timed("info", api.info(pb::InfoRequest { ledger_id: ledger }))
        .await
        .map(|r| r.into_inner().info.expect("info returns the metadata"))
}

async fn read_lac(
    api: &mut Api,
    ledger: u64,
    previous: Option<i64>,
    timeout_ms: u32,
) -> Result<pb::ReadLacResponse, Status> {
    let req = pb::ReadLacRequest {
        ledger_id: ledger,
        password: Bytes::from_static(PASSWORD),
        previous_lac: previous,
        timeout_ms,
    };
    timed("read lac", api.read_lac(req))
        .await
        .map(|r| r.into_inner())
}

/// Long-polls until the LAC reaches `target` (pipelined appends carry a stale LAC; the writer's
/// explicit LAC brings the bookies up to date once it is idle).
async fn wait_for_lac(api: &mut Api, ledger: u64, target: i64) {
    let mut lac = read_lac(api, ledger, None, 0).await.expect("read lac").lac;
    let deadline = std::time::Instant::now() + RPC_TIMEOUT;
    while lac < target {
        assert!(
            std::time::Instant::now() < deadline,
            "LAC of ledger {ledger} stuck at {lac}, expected {target}"
        );
        let r = read_lac(api, ledger, Some(lac), 5000)
            .await
            .expect("long poll");
        assert!(r.lac >= lac, "LAC went back from {lac} to {}", r.lac);
        lac = r.lac;
    }
    assert_eq!(lac, target, "LAC past the last entry");
}

fn payloads(ledger_tag: &str, n: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(format!("{ledger_tag}-entry-{i}-{}", "x".repeat(i * 7))))
        .collect()
}

#[track_caller]
fn assert_entries(got: &[pb::Entry], want: &[Bytes]) {
    let ids: Vec<u64> = got.iter().map(|e| e.entry_id).collect();
    assert_eq!(ids, (0..want.len() as u64).collect::<Vec<_>>());
    for (e, w) in got.iter().zip(want) {
        assert_eq!(&e.payload, w, "entry {}", e.entry_id);
    }
}

#[tokio::test]
async fn ledgers_written_through_the_api_survive_kill_and_restart() {
    let mut sa = StandaloneProcess::start("standalone-restart").await;
    assert_eq!(sa.addrs().bookies.len(), 3);
    let mut api = sa.ledger_client().await;

    // A closed ledger: 20 entries in 3 requests (7 + 7 + 6).
    let closed = create(&mut api, 3, 3, 2).await.expect("create");
    let closed_data = payloads("closed", 20);
    let ids = append(&mut api, closed, &closed_data, 7)
        .await
        .expect("append");
    assert_eq!(ids, (0..20).collect::<Vec<u64>>(), "ids in order");
    let meta = close(&mut api, closed).await.expect("close");
    assert_eq!(meta.state, pb::LedgerState::Closed as i32);
    assert_eq!(meta.last_entry_id, 19);
    let length: usize = closed_data.iter().map(|p| p.len()).sum();
    assert_eq!(meta.length, length as u64);
    // Close is idempotent.
    let again = close(&mut api, closed).await.expect("close again");
    assert_eq!(again.last_entry_id, 19);

    let i = info(&mut api, closed).await.expect("info");
    assert_eq!(
        (i.ensemble_size, i.write_quorum, i.ack_quorum),
        (3, 3, 2),
        "{i:?}"
    );
    assert_eq!(i.ensembles.len(), 1);
    assert_eq!(i.ensembles[0].first_entry, 0);
    assert_eq!(i.ensembles[0].bookies.len(), 3);
    assert_eq!(i.custom.get("test").map(String::as_str), Some("standalone"));

    assert_entries(
        &read(&mut api, closed, 0, -1, false).await.expect("read"),
        &closed_data,
    );
    let part = read(&mut api, closed, 5, 9, false)
        .await
        .expect("read 5..=9");
    assert_eq!(
        part.iter().map(|e| e.entry_id).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9]
    );
    // Tailing a closed ledger delivers everything, then ends.
    let tailed = collect(
        timed(
            "tail",
            api.tail(pb::TailRequest {
                ledger_id: closed,
                password: Bytes::from_static(PASSWORD),
                from_entry: 0,
            }),
        )
        .await,
    )
    .await
    .expect("tail");
    assert_entries(&tailed, &closed_data);

    // An open ledger, never closed: its writer dies with the process.
    let open = create(&mut api, 3, 2, 2).await.expect("create");
    let open_data = payloads("open", 5);
    let ids = append(&mut api, open, &open_data, 1).await.expect("append");
    assert_eq!(ids, vec![0, 1, 2, 3, 4]);
    let lac = read_lac(&mut api, open, None, 0).await.expect("read lac");
    assert!(!lac.closed);
    assert!((-1..=4).contains(&lac.lac), "LAC {} after 5 acks", lac.lac);
    wait_for_lac(&mut api, open, 4).await;

    let listed = timed("list", api.list(pb::ListRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.ledger_ids.contains(&closed) && listed.ledger_ids.contains(&open),
        "{listed:?}"
    );

    sa.kill9();
    sa.restart().await;
    let mut api = sa.ledger_client().await;

    assert_entries(
        &read(&mut api, closed, 0, -1, false)
            .await
            .expect("read after restart"),
        &closed_data,
    );
    // The new gateway does not hold the old writer.
    let (_, s) = append(&mut api, open, &open_data[..1], 1)
        .await
        .expect_err("append to a writer that died");
    assert_code(&s, Code::FailedPrecondition, "NOT_WRITER");
    // Open with recovery closes it with every acknowledged entry.
    let opened = timed(
        "open with recovery",
        api.open(pb::OpenRequest {
            ledger_id: open,
            password: Bytes::from_static(PASSWORD),
            recover: true,
        }),
    )
    .await
    .expect("recover")
    .into_inner();
    assert_eq!(opened.lac, 4);
    let oi = opened.info.expect("info");
    assert_eq!(oi.state, pb::LedgerState::Closed as i32);
    assert_eq!(oi.last_entry_id, 4);
    assert_entries(
        &read(&mut api, open, 0, 4, false).await.expect("read"),
        &open_data,
    );

    // A clean stop, and one more start on the same directory.
    sa.terminate().await;
    sa.restart().await;
    let mut api = sa.ledger_client().await;
    assert_entries(
        &read(&mut api, closed, 0, -1, false).await.expect("read"),
        &closed_data,
    );
    assert_entries(
        &read(&mut api, open, 0, -1, false).await.expect("read"),
        &open_data,
    );
    sa.terminate().await;
}

#[tokio::test]
async fn bad_input_gets_typed_errors() {
    let sa = StandaloneProcess::start("standalone-errors").await;
    let mut api = sa.ledger_client().await;

    // Unknown ledgers.
    assert_code(
        &info(&mut api, 987_654).await.expect_err("info"),
        Code::NotFound,
        "NO_SUCH_LEDGER",
    );
    assert_code(
        &read(&mut api, 987_654, 0, 0, false)
            .await
            .expect_err("read"),
        Code::NotFound,
        "NO_SUCH_LEDGER",
    );
    assert_code(
        &timed(
            "delete",
            api.delete(pb::DeleteRequest { ledger_id: 987_654 }),
        )
        .await
        .expect_err("delete"),
        Code::NotFound,
        "NO_SUCH_LEDGER",
    );
    let (_, s) = append(&mut api, 987_654, &[Bytes::from_static(b"x")], 1)
        .await
        .expect_err("append to an unknown ledger");
    assert_code(&s, Code::NotFound, "NO_SUCH_LEDGER");

    // Impossible quorums; more bookies than there are.
    assert_code(
        &create(&mut api, 2, 3, 2).await.expect_err("E < Qw"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_code(
        &create(&mut api, 5, 3, 2)
            .await
            .expect_err("E=5 on 3 bookies"),
        Code::Unavailable,
        "NOT_ENOUGH_BOOKIES",
    );
    let bad_digest = pb::CreateRequest {
        digest: 42,
        ..Default::default()
    };
    assert_code(
        &timed("create", api.create(bad_digest))
            .await
            .expect_err("unknown digest"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    let ledger = create(&mut api, 3, 3, 2).await.expect("create");
    let data = payloads("errors", 3);
    append(&mut api, ledger, &data, 3).await.expect("append");

    // Wrong password: appends, opens and reads.
    let (_, s) = append_requests(
        &mut api,
        vec![pb::AppendRequest {
            ledger_id: ledger,
            password: Bytes::from_static(b"wrong"),
            payloads: vec![Bytes::from_static(b"x")],
        }],
    )
    .await
    .expect_err("append with a wrong password");
    assert_code(&s, Code::PermissionDenied, "UNAUTHORIZED");
    let s = timed(
        "open",
        api.open(pb::OpenRequest {
            ledger_id: ledger,
            password: Bytes::from_static(b"wrong"),
            recover: false,
        }),
    )
    .await
    .expect_err("open with a wrong password");
    assert_code(&s, Code::PermissionDenied, "UNAUTHORIZED");

    // An empty request, and a payload above the entry size limit: nothing of it is written.
    let (_, s) = append_requests(
        &mut api,
        vec![pb::AppendRequest {
            ledger_id: ledger,
            password: Bytes::from_static(PASSWORD),
            payloads: vec![],
        }],
    )
    .await
    .expect_err("empty append");
    assert_code(&s, Code::InvalidArgument, "INVALID_ARGUMENT");
    let big = Bytes::from(vec![7u8; 6 << 20]);
    let (_, s) = append(&mut api, ledger, &[Bytes::from_static(b"small"), big], 2)
        .await
        .expect_err("oversized payload");
    assert_code(&s, Code::InvalidArgument, "TOO_LARGE");
    // A request naming another ledger mid-stream (on a ledger of its own: its first entry may
    // or may not be stored).
    let other = create(&mut api, 3, 3, 2).await.expect("create");
    let (ids, s) = append_requests(
        &mut api,
        vec![
            pb::AppendRequest {
                ledger_id: other,
                password: Bytes::from_static(PASSWORD),
                payloads: vec![Bytes::from_static(b"first")],
            },
            pb::AppendRequest {
                ledger_id: other + 1000,
                password: Bytes::new(),
                payloads: vec![Bytes::from_static(b"nope")],
            },
        ],
    )
    .await
    .expect_err("switching ledgers mid-stream");
    assert_code(&s, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert!(ids.len() <= 1, "{ids:?}");

    // Reads: past the LAC, and a reversed range.
    let last = data.len() as i64 - 1;
    wait_for_lac(&mut api, ledger, last).await;
    assert_code(
        &read(&mut api, ledger, 0, last + 10, false)
            .await
            .expect_err("read past the LAC"),
        Code::OutOfRange,
        "BEYOND_LAC",
    );
    assert_code(
        &read(&mut api, ledger, 2, 1, false)
            .await
            .expect_err("reversed range"),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    // A long poll for the LAC to pass the last entry ends with its timeout, LAC unchanged.
    let polled = read_lac(&mut api, ledger, Some(last), 300)
        .await
        .expect("long poll");
    assert_eq!(polled.lac, last, "{polled:?}");

    // After close: appends fail CLOSED; reads see everything.
    close(&mut api, ledger).await.expect("close");
    let (_, s) = append(&mut api, ledger, &[Bytes::from_static(b"late")], 1)
        .await
        .expect_err("append after close");
    assert_code(&s, Code::FailedPrecondition, "CLOSED");
    assert_entries(
        &read(&mut api, ledger, 0, -1, false).await.expect("read"),
        &data,
    );

    // Delete: gone for reads and info.
    timed(
        "delete",
        api.delete(pb::DeleteRequest { ledger_id: ledger }),
    )
    .await
    .expect("delete");
    assert_code(
        &info(&mut api, ledger).await.expect_err("info after delete"),
        Code::NotFound,
        "NO_SUCH_LEDGER",
    );

    // Recovery fences the gateway's own writer: later appends fail.
    let fenced = create(&mut api, 3, 3, 2).await.expect("create");
    append(&mut api, fenced, &payloads("fenced", 2), 2)
        .await
        .expect("append");
    timed(
        "recover",
        api.open(pb::OpenRequest {
            ledger_id: fenced,
            password: Bytes::from_static(PASSWORD),
            recover: true,
        }),
    )
    .await
    .expect("recover");
    let (_, s) = append(&mut api, fenced, &[Bytes::from_static(b"x")], 1)
        .await
        .expect_err("append after recovery");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
}

/// The README's Python example (grpcio stubs generated from the .proto files) against a
/// standalone instance. Skipped when python3 with grpcio and grpcio-tools is missing, unless
/// QUIRE_REQUIRE_PYTHON=1 (as in CI) makes that a failure.
#[tokio::test]
async fn python_example_runs_against_standalone() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("QUIRE_REQUIRE_PYTHON").as_deref() != Ok("1"),
            "python3 with grpcio and grpcio-tools is required (QUIRE_REQUIRE_PYTHON=1)"
        );
        println!("skipped: python3 with grpcio and grpcio-tools is not installed");
        return;
    }
    let sa = StandaloneProcess::start("standalone-python").await;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let stubs = sa.root().join("stubs");
    std::fs::create_dir_all(&stubs).expect("stubs dir");
    // The README's stub generation command, as documented.
    let gen_out = std::process::Command::new("python3")
        .current_dir(&repo)
        .args(["-m", "grpc_tools.protoc", "-I", "proto/proto"])
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg("proto/proto/quire/ledger/v1/ledger.proto")
        .output()
        .expect("run grpc_tools.protoc");
    assert!(
        gen_out.status.success(),
        "stub generation failed: {}",
        String::from_utf8_lossy(&gen_out.stderr)
    );
    let mut child = std::process::Command::new("python3")
        .current_dir(&repo)
        .arg("examples/python/ledger_example.py")
        .arg(sa.api_addr().to_string())
        .arg("--stubs")
        .arg(&stubs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python example");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait for python3").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the Python example did not finish within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().expect("python3 output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python example failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for line in [
        "appended entries [0, 1, 2]",
        "entry 0: hello",
        "entry 1: from",
        "entry 2: python",
        "info of a missing ledger: NOT_FOUND (NO_SUCH_LEDGER)",
        "ok",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
}

/// A `quire ledger-api` process; killed when dropped.
struct GatewayProcess {
    child: Option<std::process::Child>,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    async fn start(metadata: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("quire-test-ledger-api-")
            .tempdir()
            .expect("test directory");
        let addr_file = dir.path().join("addr");
        let stdout = std::fs::File::create(dir.path().join("stdout.log")).expect("log");
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).expect("log");
        let mut cmd = quire_tests::quire_command(stdout, stderr);
        cmd.args([
            "ledger-api",
            "--metadata",
            metadata,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--addr-file")
        .arg(&addr_file);
        let mut g = GatewayProcess {
            child: Some(cmd.spawn().expect("spawn quire ledger-api")),
            addr: "127.0.0.1:0".parse().expect("addr"),
            dir,
        };
        let deadline = std::time::Instant::now() + quire_tests::START_TIMEOUT;
        loop {
            let child = g.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("wait") {
                g.child = None;
                panic!("quire ledger-api exited with {status}:\n{}", g.stderr());
            }
            let bound = std::fs::read_to_string(&addr_file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok());
            if let Some(a) = bound {
                g.addr = a;
                return g;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "quire ledger-api did not serve:\n{}",
                g.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    async fn client(&self) -> Api {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint");
        let channel = timed("connect", endpoint.connect())
            .await
            .expect("connect to quire ledger-api");
        LedgerServiceClient::new(channel).max_encoding_message_size(64 << 20)
    }

    /// SIGTERM; asserts a clean exit in time.
    async fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        quire_tests::send_signal(child.id(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + quire_tests::START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(status.success(), "exit {status}:\n{}", self.stderr());
                return;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("quire ledger-api did not stop after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test]
async fn ledger_api_role_serves_the_same_ledgers() {
    let sa = StandaloneProcess::start("standalone-gateway").await;
    let mut gw = GatewayProcess::start(&format!("quire://{}", sa.addrs().metadata)).await;
    let mut via_gw = gw.client().await;
    let mut via_sa = sa.ledger_client().await;

    let ledger = create(&mut via_gw, 3, 3, 2).await.expect("create");
    let data = payloads("gateway", 10);
    append(&mut via_gw, ledger, &data, 4).await.expect("append");
    // The writer lives in the gateway that created the ledger.
    let (_, s) = append(&mut via_sa, ledger, &data[..1], 1)
        .await
        .expect_err("append through another gateway");
    assert_code(&s, Code::FailedPrecondition, "NOT_WRITER");
    close(&mut via_gw, ledger).await.expect("close");
    assert_entries(
        &read(&mut via_sa, ledger, 0, -1, false)
            .await
            .expect("read through the standalone's API"),
        &data,
    );
    gw.terminate().await;
}
