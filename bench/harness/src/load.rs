//! A small HTTP/1.1 load generator on raw keep-alive TCP connections.
//!
//! * Closed loop: `connections` connections, each sending its next request as soon as the
//!   previous answer is in (used for the cold row, whose tokens must be minted in-process).
//! * Open loop: requests are scheduled at a fixed total rate, spread evenly over the
//!   connections (wrk2's model). Latency is measured from the *scheduled* send time whenever the
//!   connection was still busy with the previous answer at that time (coordinated omission
//!   corrected), and from the actual send otherwise (so the generator's own wake-up delay is not
//!   charged to the server).
//!
//! The send times come from a [`pace`] thread, not from tokio's timer: tokio rounds every sleep
//! up to its next 1 ms tick, so "evenly spread" sends left in bursts of rate/1000 at once, and
//! each burst queued in the proxy. At 18,700 req/s that is 19 requests per tick, and the median
//! request waited behind nine others: the open-loop p50 then measured the burst, not the proxy.
//!
//! Every loop is bounded by a deadline. Only 127.0.0.1 is ever a target.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Where to send and what. The token source decides the per-request token.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    pub tokens: TokenSource,
}

/// Which `X-Auth-Token` a request carries.
#[derive(Clone)]
pub enum TokenSource {
    None,
    Fixed(Arc<str>),
    /// A new token for every request, from this function (which registers it with the IAM).
    Fresh(Arc<dyn Fn() -> String + Send + Sync>),
}

impl Target {
    fn request(&self) -> Vec<u8> {
        let mut req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: mfa-gate-bench\r\n",
            self.path, self.addr
        );
        match &self.tokens {
            TokenSource::None => {}
            TokenSource::Fixed(token) => {
                req.push_str("X-Auth-Token: ");
                req.push_str(token);
                req.push_str("\r\n");
            }
            TokenSource::Fresh(mint) => {
                req.push_str("X-Auth-Token: ");
                req.push_str(&mint());
                req.push_str("\r\n");
            }
        }
        req.push_str("\r\n");
        req.into_bytes()
    }
}

/// What a load run saw.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub ok: u64,
    pub non_2xx: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// Per-request latencies in microseconds (open loop, and closed loop when asked).
    pub latencies_us: Vec<u32>,
    /// Requests scheduled but not sent before the deadline (open loop falling behind).
    pub unsent: u64,
}

impl Outcome {
    pub fn completed(&self) -> u64 {
        self.ok + self.non_2xx
    }

    /// Requests that did not end in a 2xx: I/O errors, other statuses and (open loop) send
    /// times never sent.
    pub fn failed(&self) -> u64 {
        self.errors + self.non_2xx + self.unsent
    }

    pub fn rate(&self) -> f64 {
        self.completed() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn merge(&mut self, other: Outcome) {
        self.ok += other.ok;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.unsent += other.unsent;
        self.latencies_us.extend(other.latencies_us);
    }

    /// `q` in 0..=1, in microseconds.
    pub fn quantile_us(&mut self, q: f64) -> Option<f64> {
        if self.latencies_us.is_empty() {
            return None;
        }
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        Some(self.latencies_us[idx] as f64)
    }
}

/// One keep-alive connection with its read buffer.
pub struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    filled: usize,
}

impl Conn {
    pub fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: vec![0; 16 * 1024],
            filled: 0,
        }
    }

    pub async fn connect(&mut self) -> io::Result<()> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
            self.filled = 0;
        }
        Ok(())
    }

    pub async fn send(&mut self, request: &[u8]) -> io::Result<()> {
        self.connect().await?;
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(request).await
    }

    /// Reads one whole response; answers its status.
    pub async fn recv(&mut self) -> io::Result<u16> {
        loop {
            match parse_response(&self.buf[..self.filled]) {
                Ok(Some(parsed)) => {
                    self.buf.copy_within(parsed.consumed..self.filled, 0);
                    self.filled -= parsed.consumed;
                    if parsed.close {
                        self.stream = None;
                        self.filled = 0;
                    }
                    return Ok(parsed.status);
                }
                Ok(None) => {}
                Err(msg) => {
                    self.stream = None;
                    return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                }
            }
            if self.filled == self.buf.len() {
                let len = self.buf.len() * 2;
                if len > 16 << 20 {
                    self.stream = None;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "response too large",
                    ));
                }
                self.buf.resize(len, 0);
            }
            let stream = self.stream.as_mut().ok_or(io::ErrorKind::NotConnected)?;
            let n = stream.read(&mut self.buf[self.filled..]).await?;
            if n == 0 {
                self.stream = None;
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.filled += n;
        }
    }

    /// One request, one answer; on an I/O error the connection is dropped (and reopened by the
    /// next call).
    pub async fn exchange(&mut self, request: &[u8]) -> io::Result<u16> {
        let result = async {
            self.send(request).await?;
            self.recv().await
        }
        .await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }
}

struct Parsed {
    consumed: usize,
    status: u16,
    close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A complete response at the start of `buf`, `Ok(None)` if more bytes are needed.
fn parse_response(buf: &[u8]) -> Result<Option<Parsed>, String> {
    let Some(head_end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "non-UTF-8 head")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut content_length = None;
    let mut chunked = false;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
    }
    let body_start = head_end + 4;
    if chunked {
        let mut pos = body_start;
        loop {
            let Some(line_end) = find(&buf[pos..], b"\r\n") else {
                return Ok(None);
            };
            let size_text = std::str::from_utf8(&buf[pos..pos + line_end]).map_err(|_| "chunk")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            pos += line_end + 2;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                let Some(end) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                if end != 0 {
                    let Some(end) = find(&buf[pos..], b"\r\n\r\n") else {
                        return Ok(None);
                    };
                    pos += end + 4;
                } else {
                    pos += 2;
                }
                return Ok(Some(Parsed {
                    consumed: pos,
                    status,
                    close,
                }));
            }
            if buf.len() < pos + size + 2 {
                return Ok(None);
            }
            pos += size + 2;
        }
    }
    let len = match content_length {
        Some(len) => len,
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err("response without length (read-to-close not supported)".into()),
    };
    if buf.len() < body_start + len {
        return Ok(None);
    }
    Ok(Some(Parsed {
        consumed: body_start + len,
        status,
        close,
    }))
}

/// Closed loop for `duration`.
pub async fn closed(
    target: &Target,
    connections: usize,
    duration: Duration,
    record: bool,
) -> Outcome {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let target = target.clone();
        tasks.spawn(async move {
            let mut out = Outcome::default();
            let mut conn = Conn::new(target.addr);
            while Instant::now() < deadline {
                let request = target.request();
                let sent = Instant::now();
                match tokio::time::timeout_at(deadline.into(), conn.exchange(&request)).await {
                    Ok(Ok(status)) => {
                        if (200..300).contains(&status) {
                            out.ok += 1;
                        } else {
                            out.non_2xx += 1;
                        }
                        if record {
                            out.latencies_us.push(micros(sent.elapsed()));
                        }
                    }
                    Ok(Err(_)) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(_) => break,
                }
            }
            out
        });
    }
    let mut total = Outcome::default();
    while let Some(done) = tasks.join_next().await {
        total.merge(done.unwrap_or_default());
    }
    total.elapsed = start.elapsed();
    total
}

/// The send times of an open loop, one receiver per connection: `start + i / rate` goes to
/// connection `i % connections`, for every such time before `end`.
pub struct Schedule {
    pub slots: Vec<Slots>,
    /// Times that found their connection gone (it gave up at a timeout): never sent.
    pub dropped: Arc<AtomicU64>,
    /// The pacer thread, which ends after the last time (and so closes every `Slots`).
    pub pacer: std::thread::JoinHandle<()>,
}

/// One connection's send times, in order.
pub struct Slots(mpsc::UnboundedReceiver<Instant>);

impl Slots {
    /// The time the next request's latency counts from, `None` once the schedule is over.
    /// A send time that was already due when asked (the connection was busy with the previous
    /// answer) counts from that time; otherwise from now, when the send time arrives.
    pub async fn next(&mut self) -> Option<Instant> {
        match self.0.try_recv() {
            Ok(due) => Some(due),
            Err(mpsc::error::TryRecvError::Empty) => {
                self.0.recv().await?;
                Some(Instant::now())
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        }
    }

    /// Stops taking send times; returns how many were handed out and not taken.
    pub async fn give_up(mut self) -> u64 {
        self.0.close();
        let mut left = 0;
        while self.0.recv().await.is_some() {
            left += 1;
        }
        left
    }
}

/// Starts the thread that hands out an open loop's send times (see the module doc for why not
/// tokio's timer). It sleeps to each time with the kernel's high-resolution timer and a timer
/// slack of 1 ns (the default 50 µs would let the kernel batch wake-ups again), so it costs
/// one wake-up per request on the load generator's CPU, the same for every row.
pub fn pace(start: Instant, end: Instant, rate: f64, connections: usize) -> Schedule {
    let step = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let (senders, slots): (Vec<_>, Vec<_>) = (0..connections.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, Slots(rx))
        })
        .unzip();
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = dropped.clone();
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || {
            // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer and touches only this thread.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
            let mut at = start;
            let mut i = 0usize;
            while at < end {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                if senders[i % senders.len()].send(at).is_err() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                at = start + step.mul_f64(i as f64);
            }
        })
        .expect("spawn the pacer thread");
    Schedule {
        slots,
        dropped,
        pacer,
    }
}

/// Open loop at `rate` requests/s in total for `duration`.
pub async fn open(target: &Target, connections: usize, rate: f64, duration: Duration) -> Outcome {
    // The connections connect first, so that the schedule does not start with their handshakes.
    let mut conns = Vec::with_capacity(connections);
    let mut connect_errors = 0;
    for _ in 0..connections {
        let mut conn = Conn::new(target.addr);
        if conn.connect().await.is_err() {
            connect_errors += 1;
        }
        conns.push(conn);
    }
    let start = Instant::now();
    let deadline = start + duration;
    // Answers still outstanding at the deadline get this long to arrive.
    let drain = deadline + Duration::from_secs(2);
    let schedule = pace(start, deadline, rate, connections);
    let mut tasks = tokio::task::JoinSet::new();
    for (mut conn, mut slots) in conns.into_iter().zip(schedule.slots) {
        let target = target.clone();
        tasks.spawn(async move {
            let mut out = Outcome::default();
            while let Some(t0) = slots.next().await {
                let request = target.request();
                match tokio::time::timeout_at(drain.into(), conn.exchange(&request)).await {
                    Ok(Ok(status)) => {
                        if (200..300).contains(&status) {
                            out.ok += 1;
                        } else {
                            out.non_2xx += 1;
                        }
                        out.latencies_us.push(micros(t0.elapsed()));
                    }
                    Ok(Err(_)) => out.errors += 1,
                    Err(_) => {
                        out.errors += 1;
                        out.unsent += slots.give_up().await;
                        break;
                    }
                }
            }
            out
        });
    }
    let mut total = Outcome {
        errors: connect_errors,
        ..Outcome::default()
    };
    while let Some(done) = tasks.join_next().await {
        total.merge(done.unwrap_or_default());
    }
    // Every connection saw its schedule end, so the pacer is done.
    schedule.pacer.join().expect("the pacer thread panicked");
    total.unsent += schedule.dropped.load(Ordering::Relaxed);
    total.elapsed = duration;
    total
}

pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_deals_evenly_spaced_send_times_round_robin_until_the_end() {
        let start = Instant::now() + Duration::from_millis(5);
        let step = Duration::from_micros(100);
        let schedule = pace(start, start + step * 25, 10_000.0, 4);
        // Once the schedule is over every time is already due, so `next` gives them as dealt.
        schedule.pacer.join().unwrap();
        for (k, mut slots) in schedule.slots.into_iter().enumerate() {
            let mut got = Vec::new();
            while let Some(at) = slots.next().await {
                got.push(at);
            }
            let expected: Vec<Instant> = (k..25)
                .step_by(4)
                .map(|i| start + step * i as u32)
                .collect();
            assert_eq!(got, expected, "connection {k}");
        }
        assert_eq!(schedule.dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn send_times_of_a_connection_that_gave_up_count_as_unsent() {
        let start = Instant::now();
        let schedule = pace(start, start + Duration::from_millis(20), 1_000.0, 2);
        let mut slots = schedule.slots.into_iter();
        let (first, mut second) = (slots.next().unwrap(), slots.next().unwrap());
        let left = first.give_up().await;
        while second.next().await.is_some() {}
        // 20 times in all, 10 each: the first connection's were either waiting when it gave up
        // or refused afterwards.
        assert_eq!(left + schedule.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn parses_lengths_and_chunks() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1";
        let p = parse_response(r).unwrap().unwrap();
        assert_eq!((p.status, p.consumed, p.close), (200, r.len() - 8, false));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nok")
                .unwrap()
                .is_none()
        );
        let c = b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        let p = parse_response(c).unwrap().unwrap();
        assert_eq!((p.status, p.consumed, p.close), (403, c.len(), true));
    }
}
