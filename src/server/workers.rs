//! Where client connections run: one current-thread tokio runtime per worker thread, each
//! with its own I/O driver and timers, the accepted connections dealt to them in turn.
//!
//! Measured against tokio's multi-thread scheduler with as many workers (bench/README.md):
//! a connection — its socket moved to the worker's own I/O driver — the upstream connections
//! it borrows and the tasks it spawns stay on one thread, so an answer wakes no other thread
//! (no futex, no work stealing, no cross-core cache traffic), as nginx's worker processes do.
//! The price is that a busy connection cannot move to an idle worker; with keep-alive clients
//! spread evenly that does not arise.
//!
//! The workers are set up once per process ([`start`], from `main`); without them (tests,
//! `mfa-gate dev`, one worker asked for) connections run on the runtime that accepted them.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// The worker runtimes of this process, once started.
static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    /// 1 + the index of the worker this thread is; 0 on any other thread.
    static LANE: Cell<usize> = const { Cell::new(0) };
}

struct Workers {
    handles: Vec<Handle>,
    /// Round-robin position of the next connection.
    next: AtomicUsize,
}

/// Starts `count` worker threads, each running a current-thread runtime until the process
/// exits. Does nothing for fewer than two: one worker is the main runtime itself.
pub fn start(count: usize) -> std::io::Result<()> {
    if count < 2 || WORKERS.get().is_some() {
        return Ok(());
    }
    let mut handles = Vec::with_capacity(count);
    // Each worker says it runs (its thread named, its lane set) before `start` returns, so
    // that "ready" is logged only once every worker is there to take connections.
    let (running, workers_up) = std::sync::mpsc::channel();
    for index in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(runtime.handle().clone());
        let running = running.clone();
        std::thread::Builder::new()
            .name(format!("mfa-worker-{index}"))
            .spawn(move || {
                LANE.with(|lane| lane.set(index + 1));
                let _ = running.send(());
                runtime.block_on(std::future::pending::<()>());
            })?;
    }
    drop(running);
    for _ in 0..count {
        // A worker that died before saying so has already panicked, loudly.
        let _ = workers_up.recv();
    }
    let _ = WORKERS.set(Workers {
        handles,
        next: AtomicUsize::new(0),
    });
    Ok(())
}

/// Serves an accepted connection on the next worker, or on the current runtime when there are
/// no workers: `serve` is given the stream on the runtime that runs it.
///
/// A tokio socket belongs to the I/O driver of the runtime it was made on, which is the one
/// that accepted it. Served on a worker as it is, every readiness event of the connection
/// would wake the accepting thread first, which would then wake the worker: two threads and
/// an `eventfd` write per request (one context switch of the main thread per request,
/// bench/README.md "Full run at a99bdad"). So the socket leaves this driver here and joins
/// the worker's there.
///
/// The connection's future (the own HTTP/1.1 path and hyper's connection state, several KiB)
/// is boxed where it is made: moved by value, it was copied whole at each step of tokio's
/// spawn and again each time the task's stage changed, ≈ 5,000 instructions per connection
/// (bench/README.md, "A new connection per request").
pub fn spawn_connection<F, Fut>(stream: TcpStream, peer: SocketAddr, serve: F)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Some(workers) = WORKERS.get() else {
        tokio::spawn(Box::pin(serve(stream)));
        return;
    };
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(cause = %err, client = %peer, "cannot hand the connection to a worker");
            return;
        }
    };
    let next = workers.next.fetch_add(1, Ordering::Relaxed) % workers.handles.len();
    workers.handles[next].spawn(async move {
        match TcpStream::from_std(stream) {
            Ok(stream) => Box::pin(serve(stream)).await,
            Err(err) => {
                tracing::debug!(cause = %err, client = %peer, "a worker cannot take the connection");
            }
        }
    });
}

/// How many lanes per-thread state needs: one per worker plus one for every other thread.
pub fn lanes() -> usize {
    WORKERS.get().map_or(0, |workers| workers.handles.len()) + 1
}

/// The lane of the calling thread (see [`lanes`]).
pub fn lane() -> usize {
    LANE.with(Cell::get)
}
