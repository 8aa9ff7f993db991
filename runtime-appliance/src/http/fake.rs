//! A scripted `Backend` for the HTTP, WebSocket and client tests: containers
//! with fixed output (replayable from any offset), "cat" sessions that echo
//! stdin, and injected link drops.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::backend::{Backend, Session};
use crate::api_types::*;

/// A fake container.
#[derive(Debug, Clone, Default)]
pub struct FakeContainer {
    pub tty: bool,
    /// Output chunks (`Stdout`/`Stderr`), optionally ending with `Exit`.
    pub script: Vec<Output>,
    /// Echo stdin to stdout; closing stdin exits 0; a resize prints "size WxH\n".
    pub cat: bool,
    /// The first attach ends without an exit status after this many bytes.
    pub drop_first_at: Option<u64>,
    /// Output lost before this offset (overflow).
    pub lost: u64,
    pub attaches: u32,
}

impl FakeContainer {
    pub fn script(script: Vec<Output>) -> Self {
        Self {
            script,
            ..Self::default()
        }
    }

    pub fn cat(tty: bool) -> Self {
        Self {
            cat: true,
            tty,
            ..Self::default()
        }
    }

    fn output_len(&self) -> u64 {
        self.script
            .iter()
            .map(|o| chunk(o).map_or(0, |b| b.len() as u64))
            .sum()
    }

    fn exit(&self) -> Option<ExitStatus> {
        self.script.iter().find_map(|o| {
            if let Output::Exit(e) = o {
                Some(e.clone())
            } else {
                None
            }
        })
    }

    /// The script from offset `from`, or from the first byte not lost (the
    /// start offset then includes the gap, as the appliance's does).
    fn suffix(&self, from: u64, with_exit: bool) -> (u64, VecDeque<Output>) {
        let mut queue = VecDeque::new();
        let start = from.max(self.lost);
        let mut pos = 0u64;
        for out in &self.script {
            match (out, chunk(out)) {
                (_, Some(b)) => {
                    let end = pos + b.len() as u64;
                    if end > start {
                        let skip = start.saturating_sub(pos) as usize;
                        let part = b.slice(skip..);
                        queue.push_back(match out {
                            Output::Stderr(_) => Output::Stderr(part),
                            _ => Output::Stdout(part),
                        });
                    }
                    pos = end;
                }
                (Output::Exit(_), None) if with_exit => queue.push_back(out.clone()),
                // Lost mid-stream.
                (Output::Gap(n), None) => {
                    if pos >= start {
                        queue.push_back(out.clone());
                    }
                    pos += n;
                }
                _ => {}
            }
        }
        (start, queue)
    }
}

fn chunk(out: &Output) -> Option<&Bytes> {
    match out {
        Output::Stdout(b) | Output::Stderr(b) => Some(b),
        _ => None,
    }
}

/// The fake appliance. Clones share state.
#[derive(Clone, Default)]
pub struct FakeBackend {
    containers: Arc<Mutex<BTreeMap<String, FakeContainer>>>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl FakeBackend {
    pub fn add(&self, id: &str, container: FakeContainer) {
        self.containers.lock().unwrap().insert(id.into(), container);
    }

    /// The operations called so far, as text ("signal web TERM", ...).
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn view(id: &str, c: &FakeContainer) -> ContainerView {
        let exit = c.exit();
        ContainerView {
            id: id.into(),
            kind: "primary",
            state: if exit.is_some() { "exited" } else { "running" },
            exit_code: exit.map(|e| e.code()),
            connection: Some(1),
            output_end: c.output_len(),
            tty: false,
            forked_from: None,
            fork_failure: None,
        }
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut FakeContainer) -> T) -> Result<T, ApiError> {
        let mut map = self.containers.lock().unwrap();
        map.get_mut(id)
            .map(f)
            .ok_or_else(|| ApiError::NotFound(id.into()))
    }

    fn session(
        &self,
        id: &str,
        c: &FakeContainer,
        start: u64,
        queue: VecDeque<Output>,
        end: bool,
    ) -> FakeSession {
        let (tx, rx) = async_channel::unbounded();
        FakeSession {
            id: id.into(),
            tty: c.tty,
            start,
            offset: start,
            queue,
            end_after: None,
            end_when_drained: end,
            cat: c.cat.then_some(tx),
            rx,
            calls: self.calls.clone(),
        }
    }
}

/// A fake attachment.
pub struct FakeSession {
    id: String,
    tty: bool,
    start: u64,
    offset: u64,
    queue: VecDeque<Output>,
    /// End (without exit status) once the offset reaches this.
    end_after: Option<u64>,
    /// End once the queue is empty (logs without follow).
    end_when_drained: bool,
    cat: Option<async_channel::Sender<Output>>,
    rx: async_channel::Receiver<Output>,
    calls: Arc<Mutex<Vec<String>>>,
}

impl FakeSession {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn step(&mut self, out: Output) -> Output {
        let out = match (out, self.end_after) {
            (Output::Stdout(b), Some(limit)) if self.offset + b.len() as u64 > limit => {
                let keep = (limit - self.offset) as usize;
                self.queue.push_front(Output::Stdout(b.slice(keep..)));
                Output::Stdout(b.slice(..keep))
            }
            (Output::Stderr(b), Some(limit)) if self.offset + b.len() as u64 > limit => {
                let keep = (limit - self.offset) as usize;
                self.queue.push_front(Output::Stderr(b.slice(keep..)));
                Output::Stderr(b.slice(..keep))
            }
            (out, _) => out,
        };
        if let Output::Gap(n) = &out {
            self.offset += n;
        }
        if let Some(b) = chunk(&out) {
            self.offset += b.len() as u64;
        }
        out
    }
}

impl Session for FakeSession {
    fn id(&self) -> &str {
        &self.id
    }
    fn tty(&self) -> bool {
        self.tty
    }
    fn start(&self) -> u64 {
        self.start
    }
    fn offset(&self) -> u64 {
        self.offset
    }
    async fn next(&mut self) -> Option<Output> {
        if self.end_after.is_some_and(|limit| self.offset >= limit) {
            return None;
        }
        if let Some(out) = self.queue.pop_front() {
            let out = self.step(out);
            if matches!(out, Output::Exit(_)) {
                self.end_when_drained = true;
            }
            return Some(out);
        }
        if self.end_when_drained {
            return None;
        }
        let out = self.rx.recv().await.ok()?;
        if matches!(out, Output::Exit(_)) {
            self.end_when_drained = true;
        }
        Some(self.step(out))
    }
    fn stdin_room(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        std::future::ready(())
    }

    async fn write_stdin(&self, data: Bytes) -> Result<(), ApiError> {
        self.record(format!("stdin {}", String::from_utf8_lossy(&data)));
        if let Some(tx) = &self.cat {
            let _ = tx.send(Output::Stdout(data)).await;
        }
        Ok(())
    }
    async fn close_stdin(&self) -> Result<(), ApiError> {
        self.record("close_stdin".into());
        if let Some(tx) = &self.cat {
            let _ = tx.send(Output::Exit(ExitStatus::Code(0))).await;
        }
        Ok(())
    }
    async fn resize(&self, cols: u32, rows: u32) -> Result<(), ApiError> {
        self.record(format!("resize {cols}x{rows}"));
        if let Some(tx) = &self.cat {
            let _ = tx
                .send(Output::Stdout(Bytes::from(format!("size {cols}x{rows}\n"))))
                .await;
        }
        Ok(())
    }
}

impl Backend for FakeBackend {
    type Session = FakeSession;

    async fn list(&self) -> Vec<ContainerView> {
        self.containers
            .lock()
            .unwrap()
            .iter()
            .map(|(id, c)| Self::view(id, c))
            .collect()
    }

    async fn get(&self, id: &str) -> Result<ContainerView, ApiError> {
        self.with(id, |c| Self::view(id, c))
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<ExitStatus, ApiError> {
        self.record(format!("wait {id} {timeout:?}"));
        match self.with(id, |c| c.exit())? {
            Some(exit) => Ok(exit),
            None => {
                // Recorded when the wait is dropped (its client went away).
                struct Dropped(FakeBackend, String);
                impl Drop for Dropped {
                    fn drop(&mut self) {
                        self.0.record(format!("wait {} dropped", self.1));
                    }
                }
                let _dropped = Dropped(self.clone(), id.to_owned());
                futures_lite::future::pending().await
            }
        }
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), ApiError> {
        self.with(id, |_| ())?;
        self.record(format!("signal {id} {signal}"));
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), ApiError> {
        self.with(id, |_| ())?;
        self.record(format!("start {id}"));
        Ok(())
    }

    async fn attach(&self, id: &str, options: AttachOptions) -> Result<FakeSession, ApiError> {
        self.record(format!(
            "attach {id} from={:?} stdin={}",
            options.from, options.stdin
        ));
        let c = self.with(id, |c| {
            c.attaches += 1;
            c.clone()
        })?;
        let from = match options.from {
            From::Offset(n) => n,
            From::Live => c.output_len(),
        };
        let (start, queue) = c.suffix(from, true);
        let mut session = self.session(id, &c, start, queue, false);
        if c.attaches == 1 {
            session.end_after = c.drop_first_at;
        }
        Ok(session)
    }

    async fn exec(&self, id: &str, options: ExecOptions) -> Result<FakeSession, ApiError> {
        let n = self
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with("exec "))
            .count()
            + 1;
        self.record(format!(
            "exec {id} {:?} tty={} stdin={} size={:?} env={:?}",
            options.command, options.tty, options.stdin, options.size, options.env
        ));
        self.with(id, |_| ())?;
        let exec_id = format!("{id}.exec{n}");
        let c = FakeContainer::cat(options.tty);
        self.add(&exec_id, c.clone());
        let argv = Output::Stdout(Bytes::from(format!(
            "argv: {}\n",
            options.command.join(" ")
        )));
        Ok(self.session(&exec_id, &c, 0, VecDeque::from([argv]), false))
    }

    async fn logs(&self, id: &str, options: LogsOptions) -> Result<FakeSession, ApiError> {
        let (from, follow) = (options.from, options.follow);
        self.record(format!("logs {id} from={from} follow={follow}"));
        let c = self.with(id, |c| {
            c.attaches += u32::from(follow);
            c.clone()
        })?;
        let (start, queue) = c.suffix(from, follow);
        let mut session = self.session(id, &c, start, queue, !follow);
        if follow && c.attaches == 1 {
            session.end_after = c.drop_first_at;
        }
        Ok(session)
    }

    fn metrics(&self) -> String {
        "# TYPE fake_metric gauge\nfake_metric 1\n".into()
    }
}

/// Serves `backend` on a loopback port in the background, open to anyone
/// (no token); returns its API.
pub fn serve<B: Backend>(backend: B) -> crate::client::api::Api {
    let open = super::access::Access {
        listener: Some([127, 0, 0, 1].into()),
        ..Default::default()
    };
    serve_on(backend, "127.0.0.1:0", open)
}

/// Serves `backend` on `addr` (`unix:PATH` or `ADDR:PORT`) with `access`;
/// returns its API (without a token).
pub fn serve_on<B: Backend>(
    backend: B,
    addr: &str,
    access: super::access::Access,
) -> crate::client::api::Api {
    let listener = super::listen::ApiListener::bind(&addr.parse().unwrap()).unwrap();
    let local = listener.local_addr().unwrap();
    smol::spawn(super::serve_backend(listener, backend, access)).detach();
    crate::client::api::Api::parse(&local.to_string()).unwrap()
}

/// Runs a test future, failing it after 30 s instead of hanging.
pub fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    smol::block_on(futures_lite::future::or(f, async {
        smol::Timer::after(Duration::from_secs(30)).await;
        panic!("test timed out after 30 s");
    }))
}

/// A script: stdout "hello\n", stderr "oops\n", stdout "bye\n", exit `code`.
pub fn hello_script(code: u32) -> Vec<Output> {
    vec![
        Output::Stdout(Bytes::from_static(b"hello\n")),
        Output::Stderr(Bytes::from_static(b"oops\n")),
        Output::Stdout(Bytes::from_static(b"bye\n")),
        Output::Exit(ExitStatus::Code(code)),
    ]
}
