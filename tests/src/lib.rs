//! The harness for Quire's cross-crate integration and fault tests: real `quire` processes on
//! 127.0.0.1 ephemeral ports, driven over gRPC and HTTP, killed with SIGKILL for faults.
//!
//! Every [`BookieProcess`] owns a per-test directory holding its journal and ledger directories
//! (unless the test puts them elsewhere, e.g. on a small tmpfs), its config file, its address
//! file and one pair of log files per run (`logs/run-<n>.stdout.log`, `logs/run-<n>.stderr.log`).
//! Dropping it kills the process, so no bookie outlives its test, even a panicking one; a
//! panicking test keeps its directory and prints where the logs are.
//!
//! The binary is `$QUIRE_BIN`, or `quire` next to the test executable's directory
//! (`target/debug/quire`); `cargo test --workspace` builds it, `cargo test -p quire-tests` does
//! not (build it first with `cargo build -p quire-cli`).
//!
//! Every wait has a timeout; no helper asserts anything about how long something took.

use bytes::Bytes;
use quire_proto::StatusCode;
use quire_proto::bookie::bookie_client::BookieClient;
use quire_proto::bookie::{
    AddEntry, AddRequest, AddResponse, AddResult, ReadEntryRequest, ReadEntryResponse,
    ReadLacRequest, ReadLacResponse,
};
use quire_proto::entry::{EntryHeader, encode};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// A connected bookie client.
pub type Client = BookieClient<Channel>;

/// How long a bookie may take to start serving or to stop.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long any single RPC or add result may take before the test gives up.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// What to start a bookie with.
#[derive(Debug, Clone)]
pub struct BookieOpts {
    /// Names the test directory and the bookie id.
    pub name: String,
    /// TOML written to the bookie's config file (directories and addresses come from flags).
    pub config_toml: String,
    /// How many ledger directories to create in the test directory (ignored when
    /// `ledger_dirs` is set).
    pub ledger_dir_count: usize,
    /// Put the journal here instead of in the test directory.
    pub journal_dir: Option<PathBuf>,
    /// Use these ledger directories instead of ones in the test directory.
    pub ledger_dirs: Option<Vec<PathBuf>>,
    /// More `quire bookie` flags, after the ones the harness passes (e.g.
    /// `--session-timeout-ms 2000`, `--no-autorecovery`).
    pub args: Vec<String>,
}

impl BookieOpts {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            config_toml: String::new(),
            ledger_dir_count: 1,
            journal_dir: None,
            ledger_dirs: None,
            args: Vec::new(),
        }
    }

    /// Appends `quire bookie` flags.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args
            .extend(args.iter().map(|a| a.as_ref().to_string()));
        self
    }

    pub fn config(mut self, toml: &str) -> Self {
        self.config_toml = toml.into();
        self
    }

    pub fn ledger_dir_count(mut self, n: usize) -> Self {
        self.ledger_dir_count = n;
        self
    }

    pub fn journal_dir(mut self, d: PathBuf) -> Self {
        self.journal_dir = Some(d);
        self
    }

    pub fn ledger_dirs(mut self, d: Vec<PathBuf>) -> Self {
        self.ledger_dirs = Some(d);
        self
    }
}

/// Why a bookie did not come up.
#[derive(Debug)]
pub struct StartFailure {
    /// The exit status, when the process exited (None: it hung and was killed).
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl std::fmt::Display for StartFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "bookie exited with {s}")?,
            None => write!(f, "bookie did not serve within {START_TIMEOUT:?}")?,
        }
        write!(f, "; stderr:\n{}", tail(&self.stderr, 40))
    }
}

/// The first and last `lines / 2` lines of `text` (an error's cause comes first, a panic last).
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    if all.len() <= lines {
        return all.join("\n");
    }
    let half = lines / 2;
    format!(
        "{}\n[... {} lines ...]\n{}",
        all[..half].join("\n"),
        all.len() - 2 * half,
        all[all.len() - half..].join("\n")
    )
}

/// A `quire` command for a test: logs at `QUIRE_LOG` (default info) without anyhow backtraces,
/// no stdin, and killed with the thread that starts it, so a test runner killed on a timeout
/// leaves no process behind.
pub fn quire_command(stdout: impl Into<Stdio>, stderr: impl Into<Stdio>) -> Command {
    let mut cmd = Command::new(quire_bin());
    cmd.env(
        "QUIRE_LOG",
        std::env::var("QUIRE_LOG").unwrap_or_else(|_| "info".into()),
    )
    // anyhow's error backtraces bury the cause; panics still get theirs.
    .env(
        "RUST_LIB_BACKTRACE",
        std::env::var("RUST_LIB_BACKTRACE").unwrap_or_else(|_| "0".into()),
    )
    .stdin(Stdio::null())
    .stdout(stdout)
    .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// The `quire` binary under test.
pub fn quire_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("QUIRE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe.parent().expect("test executable has a directory");
    let bin = dir.join("..").join("quire");
    if !bin.exists() {
        panic!(
            "the quire binary is missing at {}: build it with `cargo build -p quire-cli` (or run \
             `cargo test --workspace`, which builds it), or point QUIRE_BIN at it",
            bin.display()
        );
    }
    bin
}

/// What every test process helper shares: a per-test directory (kept, with a note on stderr,
/// when the test panics), one pair of log files per run (`logs/run-<n>.stdout.log`,
/// `logs/run-<n>.stderr.log`) and the child of the current run, killed on drop.
struct TestProcess {
    /// Names the process in messages, e.g. "bookie b1".
    what: String,
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    log_dir: PathBuf,
    child: Option<Child>,
    runs: u32,
    /// Lines of stderr printed when a panicking test drops it.
    tail_on_drop: usize,
}

impl TestProcess {
    /// Creates `quire-test-<prefix>-...` with its `logs` directory.
    fn new(prefix: &str, what: String, tail_on_drop: usize) -> Self {
        let root = tempfile::Builder::new()
            .prefix(&format!("quire-test-{prefix}-"))
            .tempdir()
            .expect("create test directory");
        let root_path = root.path().to_path_buf();
        let log_dir = root_path.join("logs");
        std::fs::create_dir_all(&log_dir).expect("create log directory");
        Self {
            what,
            root: Some(root),
            root_path,
            log_dir,
            child: None,
            runs: 0,
            tail_on_drop,
        }
    }

    /// Starts a new run: `quire` with the arguments `args` adds, its output in new log files.
    fn spawn(&mut self, args: impl FnOnce(&mut Command)) {
        self.runs += 1;
        let stdout = std::fs::File::create(self.stdout_path()).expect("create stdout log");
        let stderr = std::fs::File::create(self.stderr_path()).expect("create stderr log");
        let mut cmd = quire_command(stdout, stderr);
        args(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", quire_bin().display()));
        self.child = Some(child);
    }

    /// Polls `ready` every 20 ms until it returns something. `Err(Some(status))` when the
    /// process exits first, `Err(None)` when `deadline` passes first (the process is killed).
    async fn wait_ready<T>(
        &mut self,
        deadline: Instant,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Result<T, Option<ExitStatus>> {
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
            {
                self.child = None;
                return Err(Some(status));
            }
            if let Some(r) = ready() {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `quire <args> --addr-file F` (a role that writes its bound address as the first
    /// line of its address file) and returns that address; panics with its stderr when it exits
    /// or does not serve within `timeout`.
    async fn start_role(
        &mut self,
        args: &[&str],
        addr_file: &Path,
        timeout: Duration,
    ) -> SocketAddr {
        let _ = std::fs::remove_file(addr_file);
        self.spawn(|cmd| {
            cmd.args(args).arg("--addr-file").arg(addr_file);
        });
        let deadline = Instant::now() + timeout;
        match self
            .wait_ready(deadline, || {
                std::fs::read_to_string(addr_file)
                    .ok()
                    .and_then(|t| t.lines().next()?.trim().parse::<SocketAddr>().ok())
            })
            .await
        {
            Ok(a) => a,
            Err(Some(status)) => panic!(
                "{} exited with {status} instead of serving; stderr:\n{}",
                self.what,
                tail(&self.last_stderr(), 40)
            ),
            Err(None) => panic!(
                "{} did not serve within {timeout:?}; stderr:\n{}",
                self.what,
                tail(&self.last_stderr(), 40)
            ),
        }
    }

    fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL; returns once the process is gone.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the clean shutdown; panics unless it exits 0 within `timeout`.
    async fn terminate(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        send_signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child
                .try_wait()
                .unwrap_or_else(|e| panic!("wait for {}: {e}", self.what))
            {
                assert!(
                    status.success(),
                    "{} exited with {status} after SIGTERM; stderr:\n{}",
                    self.what,
                    tail(&self.last_stderr(), 40)
                );
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {timeout:?} of SIGTERM (logs: {})",
                    self.what,
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stdout_path(&self) -> PathBuf {
        self.log_dir.join(format!("run-{}.stdout.log", self.runs))
    }

    fn stderr_path(&self) -> PathBuf {
        self.log_dir.join(format!("run-{}.stderr.log", self.runs))
    }

    fn last_stdout(&self) -> String {
        std::fs::read_to_string(self.stdout_path()).unwrap_or_default()
    }

    fn last_stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }
}

impl Drop for TestProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            if let Some(root) = self.root.take() {
                let kept = root.keep();
                eprintln!(
                    "test failed: {} kept its directory {} (logs in {})",
                    self.what,
                    kept.display(),
                    kept.join("logs").display()
                );
            }
            eprintln!(
                "last stderr of {}:\n{}",
                self.what,
                tail(&self.last_stderr(), self.tail_on_drop)
            );
        }
    }
}

/// One `quire bookie` process (and its restarts) with its directories.
pub struct BookieProcess {
    name: String,
    proc: TestProcess,
    journal_dir: PathBuf,
    ledger_dirs: Vec<PathBuf>,
    config_path: PathBuf,
    addr_file: PathBuf,
    bookie_id: String,
    args: Vec<String>,
    grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

impl BookieProcess {
    /// Creates the test directory and config without starting anything.
    pub fn prepare(opts: BookieOpts) -> Self {
        let proc = TestProcess::new(&opts.name, format!("bookie {}", opts.name), 30);
        let root_path = proc.root_path.clone();
        let journal_dir = opts
            .journal_dir
            .clone()
            .unwrap_or_else(|| root_path.join("journal"));
        let ledger_dirs = opts.ledger_dirs.clone().unwrap_or_else(|| {
            (0..opts.ledger_dir_count.max(1))
                .map(|i| root_path.join(format!("ledgers-{i}")))
                .collect()
        });
        for d in std::iter::once(&journal_dir).chain(&ledger_dirs) {
            std::fs::create_dir_all(d).expect("create bookie directory");
        }
        let config_path = root_path.join("bookie.toml");
        std::fs::write(&config_path, &opts.config_toml).expect("write config");
        Self {
            bookie_id: format!("test-{}", opts.name),
            args: opts.args,
            name: opts.name,
            addr_file: root_path.join("bookie.addr"),
            proc,
            journal_dir,
            ledger_dirs,
            config_path,
            grpc: None,
            http: None,
        }
    }

    /// Starts a bookie; panics (pointing at its logs) when it does not come up.
    pub async fn start(opts: BookieOpts) -> Self {
        let mut b = Self::prepare(opts);
        b.restart().await;
        b
    }

    /// Starts the bookie again on the current directories and config, stopping it first (with
    /// SIGTERM) if it is running.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!(
                "bookie {} failed to start ({}): {e}",
                self.name,
                self.proc.log_dir.display()
            );
        }
    }

    /// Like [`restart`](Self::restart), but a bookie that exits or hangs instead of serving is
    /// an error to inspect, not a panic.
    pub async fn try_restart(&mut self) -> Result<(), StartFailure> {
        if self.is_running() {
            self.terminate().await;
        }
        let _ = std::fs::remove_file(&self.addr_file);
        self.proc.spawn(|cmd| {
            cmd.arg("bookie")
                .arg("--config")
                .arg(&self.config_path)
                .arg("--journal-dir")
                .arg(&self.journal_dir);
            for d in &self.ledger_dirs {
                cmd.arg("--ledger-dir").arg(d);
            }
            cmd.args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
                .arg("--addr-file")
                .arg(&self.addr_file)
                .arg("--bookie-id")
                .arg(&self.bookie_id)
                .args(&self.args);
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let addr_file = &self.addr_file;
        match self
            .proc
            .wait_ready(deadline, || read_addr_file(addr_file))
            .await
        {
            Ok((grpc, http)) => {
                self.grpc = Some(grpc);
                self.http = Some(http);
                Ok(())
            }
            Err(status) => Err(StartFailure {
                status,
                stderr: self.last_stderr(),
            }),
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        assert!(self.is_running(), "bookie {} is not running", self.name);
        self.grpc.expect("address known while running")
    }

    pub fn http_addr(&self) -> SocketAddr {
        assert!(self.is_running(), "bookie {} is not running", self.name);
        self.http.expect("address known while running")
    }

    /// A new gRPC connection to the bookie.
    pub async fn client(&self) -> Client {
        let url = format!("http://{}", self.grpc_addr());
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(10));
        let channel = tokio::time::timeout(RPC_TIMEOUT, endpoint.connect())
            .await
            .expect("connect timed out")
            .expect("connect to bookie");
        BookieClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// SIGKILL: the crash fault. Returns once the process is gone.
    pub fn kill9(&mut self) {
        self.proc.kill9();
        self.grpc = None;
        self.http = None;
    }

    /// SIGTERM and wait for the clean shutdown; panics unless the bookie exits 0 in time.
    pub async fn terminate(&mut self) {
        self.grpc = None;
        self.http = None;
        self.proc.terminate(START_TIMEOUT).await;
    }

    /// Replaces the config file (takes effect at the next start).
    pub fn set_config(&mut self, toml: &str) {
        std::fs::write(&self.config_path, toml).expect("write config");
    }

    /// Changes the bookie id used from the next start on.
    pub fn set_bookie_id(&mut self, id: &str) {
        self.bookie_id = id.into();
    }

    /// Changes the journal directory used from the next start on.
    pub fn set_journal_dir(&mut self, d: PathBuf) {
        self.journal_dir = d;
    }

    /// Changes the ledger directories used from the next start on.
    pub fn set_ledger_dirs(&mut self, d: Vec<PathBuf>) {
        self.ledger_dirs = d;
    }

    pub fn journal_dir(&self) -> &Path {
        &self.journal_dir
    }

    pub fn ledger_dirs(&self) -> &[PathBuf] {
        &self.ledger_dirs
    }

    /// The per-test directory (scratch space for the test too).
    pub fn root(&self) -> &Path {
        &self.proc.root_path
    }

    pub fn log_dir(&self) -> &Path {
        &self.proc.log_dir
    }

    /// Everything the latest run wrote to stderr.
    pub fn last_stderr(&self) -> String {
        self.proc.last_stderr()
    }

    /// GET on the bookie's HTTP port.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.http_addr(), "GET", path, None)
    }

    /// PUT with a JSON body on the bookie's HTTP port.
    pub fn http_put(&self, path: &str, json: &str) -> (u16, String) {
        http_request(self.http_addr(), "PUT", path, Some(json))
    }

    /// `GET /api/v1/bookie/state`, parsed.
    pub fn state(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/api/v1/bookie/state");
        assert_eq!(code, 200, "GET state: {body}");
        serde_json::from_str(&body).expect("state is JSON")
    }

    /// One sample from `/metrics` (e.g. `quire_bookie_checkpoints_total`), when present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(code, 200, "GET /metrics: {body}");
        parse_metric(&body, name)
    }
}

fn read_addr_file(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let grpc = lines.next()?.trim().parse().ok()?;
    let http = lines.next()?.trim().parse().ok()?;
    Some((grpc, http))
}

/// Finds `name` (a sample without labels) in Prometheus/OpenMetrics text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// A tiny HTTP/1.1 client: one request per connection, 10 s timeouts. Returns the status code
/// and the body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> (u16, String) {
    let timeout = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, timeout).expect("connect to HTTP port");
    s.set_read_timeout(Some(timeout)).expect("set timeout");
    s.set_write_timeout(Some(timeout)).expect("set timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(body) = json {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).expect("send HTTP request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read HTTP response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed HTTP response: {text:?}"));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("malformed HTTP status line: {head:?}"));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The failure of a unary RPC: the Quire code and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: StatusCode,
    pub message: String,
}

impl From<tonic::Status> for RpcError {
    fn from(s: tonic::Status) -> Self {
        Self {
            code: quire_proto::status::code_of(&s),
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// Runs an RPC future with [`RPC_TIMEOUT`], mapping a failure to its Quire code.
pub async fn rpc<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, RpcError> {
    match tokio::time::timeout(RPC_TIMEOUT, f).await {
        Ok(r) => r.map(tonic::Response::into_inner).map_err(RpcError::from),
        Err(_) => panic!("RPC timed out after {RPC_TIMEOUT:?}"),
    }
}

/// Deterministic pseudo-random bytes for (seed, ledger, entry): what a test wrote can be
/// recomputed instead of remembered.
pub fn payload(seed: u64, ledger: u64, entry: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        ^ ledger.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ entry.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// An entry body in Quire's entry format, piggybacking `lac`.
pub fn body(ledger_id: u64, entry_id: u64, lac: i64, payload: &[u8]) -> Bytes {
    encode(
        &EntryHeader {
            ledger_id,
            entry_id,
            lac,
            length: payload.len() as u64,
        },
        payload,
    )
}

/// A normal (non-recovery) add of `body` with `key`.
pub fn add_entry(ledger_id: u64, entry_id: u64, key: &[u8], body: Bytes) -> AddEntry {
    AddEntry {
        ledger_id,
        entry_id,
        master_key: Bytes::copy_from_slice(key),
        recovery: false,
        body,
    }
}

/// One open add stream: requests go in through a bounded channel, results come out as they
/// arrive.
pub struct AddStream {
    tx: Option<mpsc::Sender<AddRequest>>,
    rx: tonic::Streaming<AddResponse>,
}

impl AddStream {
    pub async fn open(client: &mut Client) -> AddStream {
        let (tx, rx) = mpsc::channel(16);
        let responses = rpc(client.add(tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await
            .expect("open add stream");
        AddStream {
            tx: Some(tx),
            rx: responses,
        }
    }

    /// The sending half, to feed the stream from another task.
    pub fn sender(&self) -> mpsc::Sender<AddRequest> {
        self.tx.clone().expect("sending half not yet finished")
    }

    /// Drops this handle's sending half: the request stream ends once every
    /// [`sender`](Self::sender) clone is dropped too, and then the bookie ends the responses.
    pub fn finish(&mut self) {
        self.tx = None;
    }

    /// Queues one request; false when the stream is gone.
    pub async fn send(&self, entries: Vec<AddEntry>) -> bool {
        match &self.tx {
            Some(tx) => tx.send(AddRequest { entries }).await.is_ok(),
            None => false,
        }
    }

    /// The next batch of results: `Ok(None)` when the server ended the stream, `Err` on a
    /// transport failure. Panics after [`RPC_TIMEOUT`] without any.
    pub async fn next(&mut self) -> Result<Option<Vec<AddResult>>, tonic::Status> {
        match tokio::time::timeout(RPC_TIMEOUT, self.rx.message()).await {
            Ok(r) => r.map(|m| m.map(|m| m.results)),
            Err(_) => panic!("no add result within {RPC_TIMEOUT:?}"),
        }
    }
}

/// Adds `entries` over one new stream, `batch` per request, and returns every entry's result,
/// keyed by (ledger, entry). Panics if a result is missing.
pub async fn add_all(
    client: &mut Client,
    entries: Vec<AddEntry>,
    batch: usize,
) -> HashMap<(u64, u64), AddResult> {
    let mut stream = AddStream::open(client).await;
    let want = entries.len();
    let tx = stream.sender();
    stream.finish();
    let sender = tokio::spawn(async move {
        let mut it = entries.into_iter().peekable();
        while it.peek().is_some() {
            let chunk: Vec<AddEntry> = it.by_ref().take(batch.max(1)).collect();
            if tx.send(AddRequest { entries: chunk }).await.is_err() {
                return;
            }
        }
    });
    let mut out = HashMap::with_capacity(want);
    while out.len() < want {
        match stream.next().await {
            Ok(Some(results)) => {
                for r in results {
                    let key = (r.ledger_id, r.entry_id);
                    assert!(
                        out.insert(key, r).is_none(),
                        "two results for entry {key:?}"
                    );
                }
            }
            Ok(None) => panic!("add stream ended after {} of {want} results", out.len()),
            Err(e) => panic!(
                "add stream failed after {} of {want} results: {e}",
                out.len()
            ),
        }
    }
    let _ = sender.await;
    out
}

/// Adds one entry and returns its result code.
pub async fn add_one(client: &mut Client, entry: AddEntry) -> (StatusCode, String) {
    let key = (entry.ledger_id, entry.entry_id);
    let r = add_all(client, vec![entry], 1)
        .await
        .remove(&key)
        .expect("result");
    (code(&r), r.message)
}

/// The Quire code of an add result.
pub fn code(r: &AddResult) -> StatusCode {
    StatusCode::try_from(r.code).unwrap_or_else(|_| panic!("unknown status code {}", r.code))
}

/// Asserts that every result is OK.
pub fn assert_all_ok(results: &HashMap<(u64, u64), AddResult>) {
    for (k, r) in results {
        assert_eq!(
            code(r),
            StatusCode::Ok,
            "add of {k:?} failed: {}",
            r.message
        );
    }
}

pub async fn read_entry(
    client: &mut Client,
    ledger_id: u64,
    entry_id: i64,
) -> Result<ReadEntryResponse, RpcError> {
    rpc(client.read_entry(ReadEntryRequest {
        ledger_id,
        entry_id,
        fence: false,
        master_key: Bytes::new(),
    }))
    .await
}

pub async fn read_lac(
    client: &mut Client,
    ledger_id: u64,
    previous_lac: i64,
    timeout_ms: u32,
) -> Result<ReadLacResponse, RpcError> {
    rpc(client.read_lac(ReadLacRequest {
        ledger_id,
        previous_lac,
        timeout_ms,
    }))
    .await
}

/// Polls `check` every 50 ms until it holds; panics after `timeout`, naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tmpfs mounted on a fresh temporary directory, lazily unmounted on drop.
pub struct TmpfsMount {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TmpfsMount {
    /// Mounts a tmpfs of `size` (e.g. "64m"); `Err` with the reason when not permitted here.
    pub fn new(size: &str) -> Result<TmpfsMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("quire-tmpfs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = dir.path().to_path_buf();
        Ok(TmpfsMount {
            dir: Some(dir),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fraction of the file system in use, as `statvfs` reports it.
    pub fn usage(&self) -> f64 {
        let (free, total) = disk_space(&self.path);
        1.0 - free as f64 / total as f64
    }

    pub fn total_bytes(&self) -> u64 {
        disk_space(&self.path).1
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        drop(self.dir.take());
    }
}

/// (available bytes, total bytes) of the file system holding `path`.
pub fn disk_space(path: &Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: statvfs is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out-pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(
        rc,
        0,
        "statvfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    let frsize = st.f_frsize as u64;
    (st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize)
}

/// Every file under `dirs` with its contents, to prove that something left them untouched.
pub fn snapshot_files(dirs: &[&Path]) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(d: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read file"));
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for d in dirs {
        walk(d, &mut out);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Metadata (raft) nodes and clusters, and process helpers shared by the metadata tests.

use quire_proto::metadata::StatusResponse;

/// How long a metadata node may take to start, a cluster to form or elect a leader, or a
/// `quire` CLI command to finish.
pub const META_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished `quire` CLI command printed.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `quire <args>` to completion; panics if it takes longer than `timeout` (after killing
/// it) or cannot be spawned.
pub async fn run_quire(args: &[&str], timeout: Duration) -> CliOutput {
    run_quire_input(args, b"", timeout).await
}

/// Runs `quire <args>` with `input` on stdin and without the environment's `QUIRE_METADATA` or
/// `QUIRE_LEDGER_PASSWORD` (so only the flags count); panics if it takes longer than `timeout`
/// (after killing it) or cannot be spawned.
pub async fn run_quire_input(args: &[&str], input: &[u8], timeout: Duration) -> CliOutput {
    let mut cmd = quire_command(Stdio::piped(), Stdio::piped());
    cmd.args(args)
        .env("QUIRE_LOG", "warn")
        .env_remove("QUIRE_METADATA")
        .env_remove("QUIRE_LEDGER_PASSWORD");
    run_command(cmd, input, &format!("quire {args:?}"), timeout).await
}

/// Waits (up to `timeout`) until `bookie` is in the writable list of `store` with the address
/// it serves on now.
pub async fn wait_bookie_registered(
    store: &quire_metadata::DynStore,
    bookie: &BookieProcess,
    timeout: Duration,
) {
    let id = bookie.bookie_id().to_string();
    let addr = bookie.grpc_addr().to_string();
    let registry = quire_metadata::bookies::BookieRegistry::new(store.clone());
    wait_until(
        timeout,
        &format!("bookie {id} registered at {addr}"),
        || async {
            match tokio::time::timeout(Duration::from_secs(5), registry.writable()).await {
                Ok(Ok(list)) => list.iter().any(|b| b.id == id && b.info.addr == addr),
                _ => false,
            }
        },
    )
    .await;
}

/// Runs `cmd` (stdout and stderr piped) to completion with `input` on its stdin; panics if it
/// takes longer than `timeout` (after killing it) or cannot be spawned.
pub async fn run_command(
    mut cmd: std::process::Command,
    input: &[u8],
    what: &str,
    timeout: Duration,
) -> CliOutput {
    let mut child = cmd
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
    let pid = child.id();
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let waiter = tokio::task::spawn_blocking(move || {
        // A command that does not read stdin may exit first: a broken pipe is fine then.
        let _ = std::io::Write::write_all(&mut stdin, &input);
        drop(stdin);
        child.wait_with_output()
    });
    match tokio::time::timeout(timeout, waiter).await {
        Ok(out) => {
            let out = out
                .expect("waiter task")
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            CliOutput {
                status: out.status,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => {
            // The child is not reaped yet (its waiter still waits), so the pid is still ours.
            send_signal(pid, libc::SIGKILL);
            panic!("{what} did not finish within {timeout:?}");
        }
    }
}

/// Sends `sig` to process `pid` (a child of this test that is not reaped yet); panics on failure.
pub fn send_signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety requirements.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}) failed: {}",
        std::io::Error::last_os_error()
    );
}

impl BookieProcess {
    /// The bookie id it starts with (its key in the bookie registry).
    pub fn bookie_id(&self) -> &str {
        &self.bookie_id
    }

    /// The process id while running (for SIGSTOP/SIGCONT through [`send_signal`]).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}

/// One `quire metadata` node process (and its restarts) with its data directory.
///
/// The first start listens on `127.0.0.1:0`; every restart listens on the address bound then,
/// since the cluster membership records it. Dropping the handle kills the process; a panicking
/// test keeps the directory and prints the logs' location and tail.
pub struct MetadataNode {
    id: u64,
    proc: TestProcess,
    data_dir: PathBuf,
    addr_file: PathBuf,
    listen: SocketAddr,
}

impl MetadataNode {
    /// Starts node `id` (> 0) in a fresh directory; panics (pointing at its logs) when it does
    /// not come up.
    pub async fn start(id: u64) -> Self {
        let proc = TestProcess::new(&format!("meta-{id}"), format!("metadata node {id}"), 20);
        let mut node = MetadataNode {
            id,
            data_dir: proc.root_path.join("data"),
            addr_file: proc.root_path.join("node.addr"),
            proc,
            listen: "127.0.0.1:0".parse().expect("valid address"),
        };
        node.restart().await;
        node
    }

    /// Starts the node again on the same address and data directory, stopping it first (with
    /// SIGTERM) if it is running.
    pub async fn restart(&mut self) {
        if let Err(e) = self.try_restart().await {
            panic!(
                "metadata node {} failed to start ({}): {e}",
                self.id,
                self.proc.log_dir.display()
            );
        }
    }

    /// Like [`restart`](Self::restart), but a failure to come up is returned. A restart whose
    /// address is still held (a socket of the killed process lingering) is retried for a while.
    pub async fn try_restart(&mut self) -> Result<(), String> {
        if self.is_running() {
            self.terminate().await;
        }
        let deadline = Instant::now() + META_TIMEOUT;
        loop {
            match self.spawn_once(deadline).await {
                Ok(()) => return Ok(()),
                Err((status, stderr))
                    if status.is_some()
                        && stderr.contains("Address already in use")
                        && Instant::now() + Duration::from_millis(200) < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((status, stderr)) => {
                    let what = match status {
                        Some(s) => format!("exited with {s}"),
                        None => format!("did not serve within {META_TIMEOUT:?}"),
                    };
                    return Err(format!("{what}; stderr:\n{}", tail(&stderr, 40)));
                }
            }
        }
    }

    async fn spawn_once(&mut self, deadline: Instant) -> Result<(), (Option<ExitStatus>, String)> {
        let _ = std::fs::remove_file(&self.addr_file);
        self.proc.spawn(|cmd| {
            cmd.arg("metadata")
                .arg("--id")
                .arg(self.id.to_string())
                .arg("--listen")
                .arg(self.listen.to_string())
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--addr-file")
                .arg(&self.addr_file);
        });
        let addr_file = &self.addr_file;
        let bound = self
            .proc
            .wait_ready(deadline, || {
                std::fs::read_to_string(addr_file)
                    .ok()
                    .and_then(|t| t.lines().next()?.trim().parse::<SocketAddr>().ok())
            })
            .await;
        match bound {
            Ok(addr) => {
                assert!(
                    self.listen.port() == 0 || self.listen == addr,
                    "metadata node {} bound {addr} instead of {}",
                    self.id,
                    self.listen
                );
                self.listen = addr;
                Ok(())
            }
            Err(status) => Err((status, self.last_stderr())),
        }
    }

    /// The raft node id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address it serves on (also while stopped: a restart reuses it).
    pub fn addr(&self) -> SocketAddr {
        assert!(
            self.listen.port() != 0,
            "metadata node {} never started",
            self.id
        );
        self.listen
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// `quire://<this node>`: a store URI naming this node alone.
    pub fn uri(&self) -> String {
        format!("quire://{}", self.addr())
    }

    /// SIGKILL: the crash fault. Returns once the process is gone.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGTERM and wait for the clean shutdown; panics unless the node exits 0 in time.
    pub async fn terminate(&mut self) {
        self.proc.terminate(META_TIMEOUT).await;
    }

    /// The node's own view (Status RPC, 3 s timeout); `Err` when it is stopped or does not
    /// answer.
    pub async fn status(&self) -> Result<StatusResponse, String> {
        if !self.is_running() {
            return Err(format!("metadata node {} is not running", self.id));
        }
        let mut client = quire_metadata::raft::network::client(&self.addr().to_string())
            .map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(quire_proto::metadata::StatusRequest {});
        req.set_timeout(Duration::from_secs(3));
        match tokio::time::timeout(Duration::from_secs(5), client.status(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
            Err(_) => Err("status timed out".into()),
        }
    }

    /// The per-node directory (data directory and logs).
    pub fn root(&self) -> &Path {
        &self.proc.root_path
    }

    pub fn log_dir(&self) -> &Path {
        &self.proc.log_dir
    }

    /// Everything the latest run wrote to stderr.
    pub fn last_stderr(&self) -> String {
        self.proc.last_stderr()
    }
}

/// A raft metadata cluster of `quire metadata` processes on 127.0.0.1 ephemeral ports. Node `i`
/// (0-based) has raft id `i + 1`.
pub struct MetadataCluster {
    nodes: Vec<MetadataNode>,
}

impl MetadataCluster {
    /// Starts `n` nodes, creates the cluster on the first (`quire metadata init`), adds the
    /// others as voters (`quire metadata add-node`), and waits until every node sees all `n`
    /// members and the same leader.
    pub async fn start(n: usize) -> Self {
        assert!(n >= 1, "a cluster needs a node");
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            nodes.push(MetadataNode::start(i as u64 + 1).await);
        }
        let cluster = MetadataCluster { nodes };
        let first = cluster.nodes[0].uri();
        let out = run_quire(&["metadata", "init", "--metadata", &first], META_TIMEOUT).await;
        assert!(
            out.status.success(),
            "quire metadata init failed ({}): {}{}",
            out.status,
            out.stdout,
            out.stderr
        );
        for node in &cluster.nodes[1..] {
            let (id, addr) = (node.id().to_string(), node.addr().to_string());
            let deadline = Instant::now() + META_TIMEOUT;
            loop {
                let out = run_quire(
                    &[
                        "metadata",
                        "add-node",
                        "--metadata",
                        &first,
                        "--id",
                        &id,
                        "--addr",
                        &addr,
                    ],
                    META_TIMEOUT,
                )
                .await;
                if out.status.success() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "quire metadata add-node --id {id} kept failing ({}): {}",
                    out.status,
                    out.stderr
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let members = n;
        let deadline = Instant::now() + META_TIMEOUT;
        loop {
            let statuses = cluster.statuses().await;
            let agreed = statuses.iter().all(|s| {
                s.as_ref()
                    .is_ok_and(|s| s.members.len() == members && s.leader.is_some())
            }) && cluster.agreed_leader(&statuses).is_some();
            if agreed {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the metadata cluster did not converge within {META_TIMEOUT:?}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn node(&self, i: usize) -> &MetadataNode {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut MetadataNode {
        &mut self.nodes[i]
    }

    /// `quire://` naming every node (stopped ones included).
    pub fn uri(&self) -> String {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.uri_of(&all)
    }

    /// `quire://` naming only the nodes with these indices.
    pub fn uri_of(&self, nodes: &[usize]) -> String {
        let hosts: Vec<String> = nodes
            .iter()
            .map(|&i| self.nodes[i].addr().to_string())
            .collect();
        format!("quire://{}", hosts.join(","))
    }

    /// A store client through every node.
    pub async fn store(&self) -> quire_metadata::DynStore {
        quire_metadata::connect(&self.uri())
            .await
            .expect("connect to the metadata cluster")
    }

    /// Every node's view (Status RPC); `Err` for a stopped or silent node.
    pub async fn statuses(&self) -> Vec<Result<StatusResponse, String>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for n in &self.nodes {
            out.push(n.status().await);
        }
        out
    }

    /// The index of the leader that every running node names, when that leader is running and
    /// says it leads.
    fn agreed_leader(&self, statuses: &[Result<StatusResponse, String>]) -> Option<usize> {
        let mut leader = None;
        for (n, s) in self.nodes.iter().zip(statuses) {
            if !n.is_running() {
                continue;
            }
            let l = s.as_ref().ok()?.leader?;
            if leader.is_some_and(|x| x != l) {
                return None;
            }
            leader = Some(l);
        }
        let i = self.nodes.iter().position(|n| Some(n.id()) == leader)?;
        let s = statuses[i].as_ref().ok()?;
        (self.nodes[i].is_running() && s.state == "Leader").then_some(i)
    }

    /// The index of the current leader, if the running nodes agree on one (Status RPC).
    pub async fn leader_index(&self) -> Option<usize> {
        let statuses = self.statuses().await;
        self.agreed_leader(&statuses)
    }

    /// Waits until the running nodes agree on a leader; returns its index. Panics after
    /// `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            if let Some(i) = self.agreed_leader(&statuses) {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader within {timeout:?}: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `quire metadata status --json` over every node: one object per node, with either
    /// `id, state, leader, term, last_applied, members, ...` or `error`.
    pub async fn status_cli(&self) -> Vec<serde_json::Value> {
        let uri = self.uri();
        let out = run_quire(
            &["metadata", "status", "--metadata", &uri, "--json"],
            META_TIMEOUT,
        )
        .await;
        let parsed: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
                panic!(
                    "quire metadata status --json ({}) printed no JSON ({e}): {}{}",
                    out.status, out.stdout, out.stderr
                )
            });
        match parsed {
            serde_json::Value::Array(v) => v,
            other => panic!("quire metadata status --json printed {other}, not an array"),
        }
    }
}

/// How long `quire standalone` may take to start (metadata store, three bookies registered,
/// ledger API) or to stop.
pub const STANDALONE_TIMEOUT: Duration = Duration::from_secs(60);

/// The addresses a `quire standalone` process wrote to its `--addr-file`.
#[derive(Debug, Clone)]
pub struct StandaloneAddrs {
    pub metadata: SocketAddr,
    pub ledger_api: SocketAddr,
    pub bookies: Vec<SocketAddr>,
}

fn read_standalone_addrs(path: &Path) -> Option<StandaloneAddrs> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let addr = |v: &serde_json::Value| v.as_str()?.parse::<SocketAddr>().ok();
    Some(StandaloneAddrs {
        metadata: addr(&v["metadata"])?,
        ledger_api: addr(&v["ledger_api"])?,
        bookies: v["bookies"]
            .as_array()?
            .iter()
            .map(addr)
            .collect::<Option<Vec<_>>>()?,
    })
}

/// One `quire standalone` process (and its restarts) on a per-test data directory, every
/// server on a 127.0.0.1 ephemeral port. Dropping it kills the process; a panicking test keeps
/// the directory and prints where the logs are.
pub struct StandaloneProcess {
    proc: TestProcess,
    data_dir: PathBuf,
    addr_file: PathBuf,
    addrs: Option<StandaloneAddrs>,
}

impl StandaloneProcess {
    /// Starts `quire standalone` on a new directory; panics (with its stderr) when it does not
    /// come up.
    pub async fn start(name: &str) -> Self {
        let proc = TestProcess::new(name, "quire standalone".into(), 30);
        let mut p = StandaloneProcess {
            data_dir: proc.root_path.join("data"),
            addr_file: proc.root_path.join("addrs.json"),
            proc,
            addrs: None,
        };
        p.restart().await;
        p
    }

    /// Starts it again on the same data directory (new ports), stopping it first with SIGTERM
    /// if it is running.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.terminate().await;
        }
        let _ = std::fs::remove_file(&self.addr_file);
        self.proc.spawn(|cmd| {
            cmd.arg("standalone")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--addr-file")
                .arg(&self.addr_file)
                .args([
                    "--metadata-listen",
                    "127.0.0.1:0",
                    "--api-listen",
                    "127.0.0.1:0",
                    "--bookie-listen-base",
                    "127.0.0.1:0",
                    "--bookie-http-base",
                    "127.0.0.1:0",
                ]);
        });
        let deadline = Instant::now() + STANDALONE_TIMEOUT;
        let addr_file = &self.addr_file;
        match self
            .proc
            .wait_ready(deadline, || read_standalone_addrs(addr_file))
            .await
        {
            Ok(a) => self.addrs = Some(a),
            Err(Some(status)) => panic!(
                "quire standalone exited with {status} instead of serving; stderr:\n{}",
                tail(&self.last_stderr(), 40)
            ),
            Err(None) => panic!(
                "quire standalone did not serve within {STANDALONE_TIMEOUT:?}; stderr:\n{}",
                tail(&self.last_stderr(), 40)
            ),
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// The addresses of the current run.
    pub fn addrs(&self) -> &StandaloneAddrs {
        assert!(self.is_running(), "quire standalone is not running");
        self.addrs.as_ref().expect("addresses known while running")
    }

    /// The ledger API address of the current run.
    pub fn api_addr(&self) -> SocketAddr {
        self.addrs().ledger_api
    }

    /// A new gRPC client of the ledger API.
    pub async fn ledger_client(
        &self,
    ) -> quire_proto::ledger::ledger_service_client::LedgerServiceClient<Channel> {
        let url = format!("http://{}", self.api_addr());
        let endpoint = tonic::transport::Endpoint::from_shared(url)
            .expect("valid endpoint")
            .connect_timeout(Duration::from_secs(10));
        let channel = tokio::time::timeout(RPC_TIMEOUT, endpoint.connect())
            .await
            .expect("connect timed out")
            .expect("connect to the ledger API");
        quire_proto::ledger::ledger_service_client::LedgerServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// SIGKILL: the crash fault. Returns once the process is gone.
    pub fn kill9(&mut self) {
        self.proc.kill9();
        self.addrs = None;
    }

    /// SIGTERM and wait for the clean shutdown; panics unless it exits 0 in time.
    pub async fn terminate(&mut self) {
        self.addrs = None;
        self.proc.terminate(STANDALONE_TIMEOUT).await;
    }

    /// The `--data-dir` it runs on.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The per-test directory (scratch space for the test too).
    pub fn root(&self) -> &Path {
        &self.proc.root_path
    }

    pub fn log_dir(&self) -> &Path {
        &self.proc.log_dir
    }

    /// Everything the latest run wrote to stdout.
    pub fn last_stdout(&self) -> String {
        self.proc.last_stdout()
    }

    /// Everything the latest run wrote to stderr.
    pub fn last_stderr(&self) -> String {
        self.proc.last_stderr()
    }
}

// ------------------------------------------------------------------------------------------------
// `quire autorecovery` daemons.

/// How long a `quire autorecovery` daemon may take to start serving or to stop.
pub const AUTORECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// One `quire autorecovery` daemon (and its restarts): `--metadata URI --id ID --http
/// 127.0.0.1:0 --addr-file F` plus the test's flags. Dropping it kills the process; a panicking
/// test keeps its directory and prints where the logs are.
pub struct AutoRecoveryProcess {
    id: String,
    metadata: String,
    args: Vec<String>,
    proc: TestProcess,
    addr_file: PathBuf,
    http: Option<SocketAddr>,
}

impl AutoRecoveryProcess {
    /// Starts daemon `id` (its name in the auditor election, the worker list and ledger locks)
    /// against the metadata store `metadata`, with more flags `args` (e.g.
    /// `--lost-bookie-recovery-delay 3s`); panics (with its stderr) when it does not serve.
    pub async fn start<S: AsRef<str>>(id: &str, metadata: &str, args: &[S]) -> Self {
        let proc = TestProcess::new(&format!("ar-{id}"), format!("autorecovery {id}"), 30);
        let mut p = AutoRecoveryProcess {
            id: id.into(),
            metadata: metadata.into(),
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            addr_file: proc.root_path.join("http.addr"),
            proc,
            http: None,
        };
        p.restart().await;
        p
    }

    /// Starts it again with the same id and flags, stopping it first (with SIGTERM) if it is
    /// running.
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.terminate().await;
        }
        let mut args = vec![
            "autorecovery",
            "--metadata",
            &self.metadata,
            "--id",
            &self.id,
            "--http",
            "127.0.0.1:0",
        ];
        args.extend(self.args.iter().map(String::as_str));
        let addr = self
            .proc
            .start_role(&args, &self.addr_file, AUTORECOVERY_TIMEOUT)
            .await;
        self.http = Some(addr);
    }

    /// Its name in the auditor election, the worker list and ledger locks.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// The process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The HTTP address of the current run.
    pub fn http_addr(&self) -> SocketAddr {
        assert!(self.is_running(), "autorecovery {} is not running", self.id);
        self.http.expect("address known while running")
    }

    /// GET on the daemon's HTTP port.
    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_request(self.http_addr(), "GET", path, None)
    }

    /// `GET /status`, parsed (what `quire autorecovery status --json` prints).
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/status");
        assert_eq!(code, 200, "GET /status of autorecovery {}: {body}", self.id);
        serde_json::from_str(&body).expect("status is JSON")
    }

    /// One sample from `/metrics` (e.g. `quire_autorecovery_auditor_active`), when present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (code, body) = self.http_get("/metrics");
        assert_eq!(
            code, 200,
            "GET /metrics of autorecovery {}: {body}",
            self.id
        );
        parse_metric(&body, name)
    }

    /// SIGKILL: the crash fault. Returns once the process is gone.
    pub fn kill9(&mut self) {
        self.proc.kill9();
        self.http = None;
    }

    /// SIGTERM and wait for the clean shutdown; panics unless it exits 0 in time.
    pub async fn terminate(&mut self) {
        self.http = None;
        self.proc.terminate(AUTORECOVERY_TIMEOUT).await;
    }

    /// The per-test directory.
    pub fn root(&self) -> &Path {
        &self.proc.root_path
    }

    pub fn log_dir(&self) -> &Path {
        &self.proc.log_dir
    }

    /// Everything the latest run wrote to stdout.
    pub fn last_stdout(&self) -> String {
        self.proc.last_stdout()
    }

    /// Everything the latest run wrote to stderr.
    pub fn last_stderr(&self) -> String {
        self.proc.last_stderr()
    }
}

/// How long a stream/table server may take to start serving or to stop.
pub const STREAM_TABLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One `quire stream-table` server (and its restarts), listening on an ephemeral loopback port.
pub struct StreamTableProcess {
    id: String,
    metadata: String,
    args: Vec<String>,
    proc: TestProcess,
    addr_file: PathBuf,
    addr: Option<SocketAddr>,
}

impl StreamTableProcess {
    /// Starts server `id` against the metadata store `metadata` with more flags `args` (e.g.
    /// `--session-timeout 2s`); panics (with its stderr) when it does not serve.
    pub async fn start<S: AsRef<str>>(id: &str, metadata: &str, args: &[S]) -> Self {
        let proc = TestProcess::new(&format!("st-{id}"), format!("stream-table {id}"), 40);
        let mut p = StreamTableProcess {
            id: id.into(),
            metadata: metadata.into(),
            args: args.iter().map(|a| a.as_ref().to_string()).collect(),
            addr_file: proc.root_path.join("grpc.addr"),
            proc,
            addr: None,
        };
        p.restart().await;
        p
    }

    /// Starts it again with the same id and flags (SIGTERM first if it is running).
    pub async fn restart(&mut self) {
        if self.is_running() {
            self.terminate().await;
        }
        let mut args = vec![
            "stream-table",
            "--metadata",
            &self.metadata,
            "--id",
            &self.id,
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend(self.args.iter().map(String::as_str));
        let addr = self
            .proc
            .start_role(&args, &self.addr_file, STREAM_TABLE_TIMEOUT)
            .await;
        self.addr = Some(addr);
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// The gRPC address of the current run.
    pub fn addr(&self) -> SocketAddr {
        assert!(self.is_running(), "stream-table {} is not running", self.id);
        self.addr.expect("address known while running")
    }

    /// SIGKILL: the crash fault. Returns once the process is gone.
    pub fn kill9(&mut self) {
        self.proc.kill9();
        self.addr = None;
    }

    /// SIGTERM and wait for the clean shutdown; panics unless it exits 0 in time.
    pub async fn terminate(&mut self) {
        self.addr = None;
        self.proc.terminate(STREAM_TABLE_TIMEOUT).await;
    }

    pub fn log_dir(&self) -> &Path {
        &self.proc.log_dir
    }

    /// Everything the latest run wrote to stderr.
    pub fn last_stderr(&self) -> String {
        self.proc.last_stderr()
    }
}
