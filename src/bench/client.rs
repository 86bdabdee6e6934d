//! Loopback helpers shared by the `ponder bench` commands that drive a
//! second `ponder serve` process: starting it (and killing it on drop),
//! waiting until it is healthy, and HTTP/1.1 spoken by hand over a tokio
//! `TcpStream` with `Connection: close`, including chunked bodies read
//! piece by piece and server-sent events, so the benches can time the
//! first streamed token and close a connection mid-response.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The marker `ponder serve` logs once bound (src/server.rs); the address
/// follows it.
const LISTENING: &str = "listening on http://";
/// Server log lines kept to explain a failed start.
const KEPT_LINES: usize = 20;

/// Requests whose `x-request-id` starts with this are looked up in the
/// server's log (see [`Server::logged`]); a bench sends such ids to match
/// what its clients saw with what the server recorded.
pub const TRACKED_ID_PREFIX: &str = "bench-";

/// What the server's log line says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Logged {
    pub status: u16,
    /// What the handler answered (differs from `status` for 499s).
    pub sent_status: u16,
    pub total_ms: f64,
}

type RequestLog = Arc<Mutex<HashMap<String, Logged>>>;

/// A `ponder serve` child process, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: String,
    requests: RequestLog,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log line of the request with this tracked id, once written.
    pub fn logged(&self, id: &str) -> Option<Logged> {
        self.requests.lock().expect("the log reader never panics holding the lock").get(id).copied()
    }

    /// Every tracked request that has its log line.
    pub fn logged_all(&self) -> HashMap<String, Logged> {
        self.requests.lock().expect("the log reader never panics holding the lock").clone()
    }

    /// Whether the child has exited (it should run until dropped).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ponder serve --config FILE --port 0` (this same executable) and
/// returns once it has logged its address. Text logs are forced so the
/// address line has one known shape whatever the file's `logging.format`.
pub fn start_serve(config: &Path, timeout: Duration) -> anyhow::Result<Server> {
    anyhow::ensure!(config.is_file(), "config file {} not found", config.display());
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(["serve", "--port", "0", "--log-format", "text", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("stderr was configured as piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(KEPT_LINES)));
    let kept = tail.clone();
    let requests = RequestLog::default();
    let logged = requests.clone();
    // The reader keeps draining after the address arrives: the server logs a
    // line per request and would block on a full pipe otherwise.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = parse_listening(&line) {
                let _ = tx.send(addr);
            }
            if let Some((id, l)) = parse_request_line(&line) {
                logged.lock().expect("only this thread holds the lock while inserting").insert(id, l);
            }
            let mut t = kept.lock().expect("only this thread and a reader that never panics hold the lock");
            if t.len() == KEPT_LINES {
                t.pop_front();
            }
            t.push_back(line);
        }
    });
    let mut server = Server { child, addr: String::new(), requests };
    match rx.recv_timeout(timeout) {
        Ok(addr) => {
            server.addr = addr;
            Ok(server)
        }
        Err(e) => {
            let _ = server.child.kill();
            let status = server.child.wait().ok();
            let lines: Vec<String> = tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default();
            anyhow::bail!(
                "ponder serve did not report its address ({e}; exit status {status:?}); last log lines:\n{}",
                lines.join("\n")
            )
        }
    }
}

/// The `host:port` after [`LISTENING`] in a log line, if it has one.
fn parse_listening(line: &str) -> Option<String> {
    let rest = line.split(LISTENING).nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    (!addr.is_empty()).then_some(addr)
}

/// A text-format request log line (`... ponder::request: request id=…
/// status=… sent_status=… total_ms=…`) of a tracked id.
fn parse_request_line(line: &str) -> Option<(String, Logged)> {
    if !line.contains("ponder::request") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace().find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let id = field("id")?;
    if !id.starts_with(TRACKED_ID_PREFIX) {
        return None;
    }
    let logged = Logged {
        status: field("status")?.parse().ok()?,
        sent_status: field("sent_status")?.parse().ok()?,
        total_ms: field("total_ms")?.parse().ok()?,
    };
    Some((id.to_string(), logged))
}

/// Polls `GET /health` until it answers 200 (503 while models load).
pub async fn wait_healthy(addr: &str, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(r) = request(addr, "GET", "/health", None).await
            && r.head.status == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("GET /health did not answer 200 within {timeout:?}")
}

/// Status line and headers of a response (names lower-cased).
#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `Retry-After` in seconds (the form ponder sends), if present.
    pub fn retry_after(&self) -> Option<Duration> {
        self.header("retry-after")?.trim().parse::<u64>().ok().map(Duration::from_secs)
    }

    fn framing(&self) -> Framing {
        let chunked =
            self.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        if chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(n) = self.header("content-length").and_then(|v| v.trim().parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::Close
        }
    }
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

#[derive(Debug, Clone, Copy)]
enum ChunkState {
    Size,
    Data(usize),
    DataEnd,
    Trailers,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(usize),
    Chunked(ChunkState),
    Close,
}

/// One exchange on its own connection; dropping it closes the connection.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read from the socket and not consumed yet.
    buf: Vec<u8>,
    framing: Framing,
    done: bool,
}

/// Connects and sends one request; the response is read from the `Conn`.
pub async fn send(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Conn> {
    send_with(addr, method, path, body, &[]).await
}

/// [`send`] with extra request headers.
pub async fn send_with(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Conn> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    Ok(Conn { stream, buf: Vec::new(), framing: Framing::Close, done: false })
}

/// Sends one request and reads the whole response.
pub async fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Response> {
    let mut conn = send(addr, method, path, body).await?;
    let head = conn.head().await?;
    let body = conn.body_to_end().await?;
    Ok(Response { head, body })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    /// Reads more bytes into `buf`; false at end of stream.
    async fn fill(&mut self) -> anyhow::Result<bool> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Takes one `\r\n`-terminated line from the buffer, reading as needed.
    async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            anyhow::ensure!(self.fill().await?, "connection closed inside a header or chunk line");
        }
    }

    /// Reads the status line and headers.
    pub async fn head(&mut self) -> anyhow::Result<Head> {
        let status_line = self.line().await?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let head = Head { status, headers };
        self.framing = head.framing();
        Ok(head)
    }

    /// The next piece of the (de-chunked) body; `None` once it is complete.
    /// Call after [`Conn::head`].
    pub async fn next_piece(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            if self.done {
                return Ok(None);
            }
            match self.framing {
                Framing::Length(0) => self.done = true,
                Framing::Length(n) => {
                    if self.buf.is_empty() {
                        anyhow::ensure!(self.fill().await?, "connection closed with {n} body bytes unread");
                    }
                    let take = n.min(self.buf.len());
                    self.framing = Framing::Length(n - take);
                    return Ok(Some(self.buf.drain(..take).collect()));
                }
                Framing::Close => {
                    if self.buf.is_empty() && !self.fill().await? {
                        self.done = true;
                        continue;
                    }
                    return Ok(Some(std::mem::take(&mut self.buf)));
                }
                Framing::Chunked(state) => {
                    if let Some(piece) = self.chunked_step(state).await? {
                        return Ok(Some(piece));
                    }
                }
            }
        }
    }

    /// Advances the chunked decoder by one state; data when it yields some.
    async fn chunked_step(&mut self, state: ChunkState) -> anyhow::Result<Option<Vec<u8>>> {
        match state {
            ChunkState::Size => {
                let line = self.line().await?;
                let hex = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(hex, 16)
                    .map_err(|_| anyhow::anyhow!("bad chunk size line {line:?}"))?;
                let next = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                self.framing = Framing::Chunked(next);
            }
            ChunkState::Data(n) => {
                if self.buf.is_empty() {
                    anyhow::ensure!(self.fill().await?, "connection closed inside a chunk");
                }
                let take = n.min(self.buf.len());
                let next = if take == n { ChunkState::DataEnd } else { ChunkState::Data(n - take) };
                self.framing = Framing::Chunked(next);
                return Ok(Some(self.buf.drain(..take).collect()));
            }
            ChunkState::DataEnd => {
                let rest = self.line().await?;
                anyhow::ensure!(rest.is_empty(), "chunk not followed by CRLF");
                self.framing = Framing::Chunked(ChunkState::Size);
            }
            ChunkState::Trailers => {
                if self.line().await?.is_empty() {
                    self.done = true;
                }
            }
        }
        Ok(None)
    }

    /// The rest of the body.
    pub async fn body_to_end(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(piece) = self.next_piece().await? {
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// The next server-sent event's `data` (its `data:` lines joined);
    /// `None` once the body is complete.
    pub async fn next_sse_data(&mut self, pending: &mut String) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(i) = pending.find("\n\n") {
                let event: String = pending.drain(..i + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    return Ok(Some(data.join("\n")));
                }
                continue;
            }
            match self.next_piece().await? {
                // Events are ASCII-delimited JSON; a UTF-8 sequence split
                // across pieces is rare and only affects content text.
                Some(piece) => pending.push_str(&String::from_utf8_lossy(&piece).replace("\r\n", "\n")),
                None => return Ok(None),
            }
        }
    }
}

/// The sum over labels of every sample of `name` in a Prometheus text exposition.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    metric_samples(text, name).map(|(_, v)| v).sum()
}

/// `(labels, value)` of every sample of `name` (labels as written between braces).
pub fn metric_samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter(|l| !l.starts_with('#')).filter_map(move |l| {
        let rest = l.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (labels, v) = r.split_once('}')?;
                (labels, v)
            }
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        Some((labels, value.split_whitespace().next()?.parse().ok()?))
    })
}

/// The value of label `key` in a sample's label text (`a="x",b="y"`).
pub fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// The `q` quantile of `values` (nearest rank); `None` when empty.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_read_from_text_and_json_log_lines() {
        let text = "2025-01-01T00:00:00Z  INFO ponder::server: listening on http://127.0.0.1:40123";
        assert_eq!(parse_listening(text).as_deref(), Some("127.0.0.1:40123"));
        let json = r#"{"fields":{"message":"listening on http://127.0.0.1:5"},"level":"INFO"}"#;
        assert_eq!(parse_listening(json).as_deref(), Some("127.0.0.1:5"));
        assert_eq!(parse_listening("loading model"), None);
    }

    #[test]
    fn request_lines_of_tracked_ids_are_read_from_the_text_log() {
        let line = "2026-12-02T01:00:00Z  INFO ponder::request: request id=bench-3-17 route=/v1/chat/completions \
                    status=499 sent_status=200 model=ponder-arith prompt_tokens=9 completion_tokens=40 \
                    total_ms=212.0 stream=true body=\"aborted\"";
        let (id, l) = parse_request_line(line).expect("a tracked request line");
        assert_eq!(id, "bench-3-17");
        assert_eq!(l, Logged { status: 499, sent_status: 200, total_ms: 212.0 });
        assert_eq!(
            parse_request_line(&line.replace("bench-3-17", "0af3")),
            None,
            "untracked ids are skipped"
        );
        assert_eq!(parse_request_line("INFO ponder::server: listening on http://x"), None);
    }

    #[test]
    fn metrics_are_summed_over_labels_and_read_by_label() {
        let text = "# HELP x\nponder_c{model=\"a\"} 2\nponder_c{model=\"b\"} 3\nponder_cc 9\nponder_h{route=\"/v1\",status=\"503\"} 4\n";
        assert_eq!(metric_sum(text, "ponder_c"), 5.0);
        let (labels, v) = metric_samples(text, "ponder_h").next().expect("one sample is present");
        assert_eq!((label(labels, "status"), v), (Some("503"), 4.0));
    }

    #[tokio::test]
    async fn chunked_server_sent_events_are_read_event_by_event() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback binds");
        let addr = listener.local_addr().expect("a bound listener has an address").to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("the test connects");
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req).await;
            let body = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                        6\r\ndata: \r\n8\r\n{\"a\":1}\n\r\n1\r\n\n\r\n\
                        e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
            s.write_all(body.as_bytes()).await.expect("the test reads");
        });
        let mut conn = send(&addr, "POST", "/x", Some("{}")).await.expect("the listener accepts");
        assert_eq!(conn.head().await.expect("a head is sent").status, 200);
        let mut pending = String::new();
        let mut events = Vec::new();
        while let Some(d) = conn.next_sse_data(&mut pending).await.expect("the body is well formed") {
            events.push(d);
        }
        assert_eq!(events, ["{\"a\":1}", "[DONE]"]);
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.99), Some(3.0));
    }
}
