//! Bodies on the intercepted path: `Tap` keeps a capped copy for the
//! record; `MaskBody` decodes (Content-Encoding), masks and passes a
//! response on as it flows, and fails the stream visibly when it cannot.
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::header::HeaderMap;

use super::{decode::Decoder, headers, BoxError};
use crate::{
    record::{BodyRecord, Decision, Header, ToolCallRecord},
    scan::StreamMasker,
    tools::stream::{Step, ToolGuard},
};

#[derive(Default)]
pub struct MaskReport {
    pub masked: std::collections::BTreeMap<(usize, String), u64>,
    pub error: Option<String>,
    /// Tool calls the answer carried, as judged, and the decisions of
    /// the rules that matched them.
    pub tool_calls: Vec<ToolCallRecord>,
    pub tool_decisions: Vec<Decision>,
}

/// A response body passed through a decoder (when the upstream compressed
/// it) and a `StreamMasker`: frames flow as soon as their text is settled.
/// A decode or scan failure ends the body with an error, which the client
/// sees (HTTP/1.1: the connection closes before the last chunk; HTTP/2:
/// RST_STREAM), never as a clean, silently shortened body.
pub struct MaskBody<B> {
    inner: B,
    decoder: Option<Decoder>,
    masker: StreamMasker,
    report: Arc<std::sync::Mutex<MaskReport>>,
    /// Trailers waiting for the flushed tail to go out first.
    trailers: Option<HeaderMap>,
    done: bool,
    /// Armed while the upstream is quiet and text is held back.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Masked spans already in the shared report (it is copied only when
    /// this changes, not on every frame).
    reported: u64,
    /// Tool calls in a streamed answer, held until judged whole.
    guard: Option<ToolGuard>,
    /// The upstream's body ended (a held call may still be waited on).
    upstream_done: bool,
}

/// How long held-back text may wait for more of the stream before it is
/// scanned as it stands and sent (see `StreamMasker::flush_idle`).
pub const IDLE_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

impl<B> MaskBody<B> {
    pub fn new(
        inner: B,
        decoder: Option<Decoder>,
        masker: StreamMasker,
        report: Arc<std::sync::Mutex<MaskReport>>,
    ) -> Self {
        Self {
            inner,
            decoder,
            masker,
            report,
            trailers: None,
            done: false,
            idle: None,
            reported: 0,
            guard: None,
            upstream_done: false,
        }
    }

    /// Judges the tool calls of the (masked) stream before they go out.
    pub fn with_guard(mut self, guard: ToolGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Masked bytes through the tool-call guard: what may go out now. A
    /// blocked call ends the stream after the API's error event; a held
    /// one makes the body wait (`poll_frame` polls the guard first).
    fn guarded(&mut self, out: Vec<u8>, last: bool) -> Vec<u8> {
        let Some(g) = &mut self.guard else {
            return out;
        };
        let step = g.push(&out);
        let step = match step {
            Step::Pass(mut b) if last => match g.finish() {
                Step::Pass(rest) => {
                    b.extend(rest);
                    Step::Pass(b)
                }
                Step::Wait(rest) => {
                    b.extend(rest);
                    Step::Wait(b)
                }
                Step::Blocked {
                    out: e,
                    call,
                    rule,
                    message,
                } => {
                    b.extend(e);
                    Step::Blocked {
                        out: b,
                        call,
                        rule,
                        message,
                    }
                }
            },
            Step::Wait(b) if last => {
                // The end comes once the held call is decided.
                let _ = g.finish();
                Step::Wait(b)
            }
            other => other,
        };
        self.after(step)
    }

    /// The bytes of a guard step; a block ends the body.
    fn after(&mut self, step: Step) -> Vec<u8> {
        match step {
            Step::Pass(b) | Step::Wait(b) => b,
            Step::Blocked { out, .. } => {
                // The rest of the upstream's answer is not read or sent.
                self.done = true;
                self.trailers = None;
                self.report(None);
                out
            }
        }
    }

    /// Publishes new mask counts (cheap when nothing new was masked).
    fn report_masks(&mut self) {
        let n: u64 = self.masker.masked.values().sum();
        if n != self.reported {
            self.reported = n;
            self.report(None);
        }
    }

    fn report(&mut self, error: Option<String>) {
        let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
        r.masked = self.masker.masked.clone();
        if error.is_some() {
            r.error = error;
        }
    }

    fn fail(&mut self, e: impl std::fmt::Display) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let msg = e.to_string();
        self.report(Some(msg.clone()));
        self.done = true;
        self.trailers = None;
        Poll::Ready(Some(Err(msg.into())))
    }
}

impl<B> Body for MaskBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            // A tool call held for a human: nothing moves until decided.
            if let Some(g) = this.guard.as_mut().filter(|g| g.is_waiting()) {
                let step = match g.poll_wait(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(step) => step,
                };
                let out = this.after(step);
                let waits = this.guard.as_ref().is_some_and(ToolGuard::is_waiting);
                if this.upstream_done && !waits {
                    this.report(None);
                    this.done = true;
                }
                if !out.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                continue;
            }
            if this.upstream_done {
                this.done = true;
                continue;
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if !matches!(polled, Poll::Pending) {
                this.idle = None;
            }
            match polled {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let plain = match &mut this.decoder {
                            Some(d) => match d.push(&data) {
                                Ok(p) => p,
                                Err(e) => return this.fail(e),
                            },
                            None => data.to_vec(),
                        };
                        let out = match this.masker.push(&plain) {
                            Ok(o) => o,
                            Err(e) => return this.fail(e),
                        };
                        let out = this.guarded(out, false);
                        if !out.is_empty() {
                            this.report_masks();
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut t) = frame.into_trailers() {
                            if let Err(e) = super::response::mask_headers(&mut t, &mut this.masker)
                            {
                                return this.fail(e);
                            }
                            this.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    let e: BoxError = e.into();
                    this.report(Some(format!("upstream body: {e}")));
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    let mut tail = match this.decoder.as_mut().map(Decoder::finish) {
                        Some(Ok(t)) => t,
                        Some(Err(e)) => return this.fail(e),
                        None => Vec::new(),
                    };
                    if !tail.is_empty() {
                        tail = match this.masker.push(&tail) {
                            Ok(o) => o,
                            Err(e) => return this.fail(e),
                        };
                    }
                    match this.masker.finish() {
                        Ok(t) => tail.extend(t),
                        Err(e) => return this.fail(e),
                    }
                    let tail = this.guarded(tail, true);
                    this.upstream_done = true;
                    if !this.guard.as_ref().is_some_and(ToolGuard::is_waiting) {
                        this.report(None);
                        this.done = true;
                    }
                    if !tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(tail)))));
                    }
                }
                Poll::Pending => {
                    if !this.masker.holds() {
                        return Poll::Pending;
                    }
                    let timer = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(IDLE_FLUSH)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.idle = None;
                    match this.masker.flush_idle().map(|o| this.guarded(o, false)) {
                        Ok(out) if !out.is_empty() => {
                            this.report_masks();
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                        Ok(_) => return Poll::Pending,
                        Err(e) => return this.fail(e),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.decoder.is_none() && self.masker.preserves_length() && self.guard.is_none() {
            self.inner.size_hint()
        } else {
            // Decoded, or masks written into JSON escapes: the length is
            // not known in advance (Content-Length was removed).
            SizeHint::default()
        }
    }
}

/// What a `Tap` saw of its body.
#[derive(Default)]
pub struct Captured {
    pub body: BodyRecord,
    pub trailers: Vec<Header>,
}

/// Which body of an exchange a `Tap` copies.
#[derive(Clone, Copy)]
pub enum Side {
    Request,
    Response,
}

/// What runs once an exchange's bodies are in: the request's copy and,
/// when it was asked for, the response's.
pub type Completion = Box<dyn FnOnce(Captured, Option<Captured>) + Send>;

/// Where the copies of an exchange's two bodies meet. Whichever comes
/// last runs the completion in place, in the poll (or drop) that ended
/// its body: no task and no wake-up per exchange just to write its record.
#[derive(Default)]
pub struct Meet(std::sync::Mutex<MeetState>);

#[derive(Default)]
struct MeetState {
    request: Option<Captured>,
    response: Option<Captured>,
    with_response: bool,
    then: Option<Completion>,
}

impl Meet {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn deliver(&self, side: Side, c: Captured) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match side {
            Side::Request => st.request = Some(c),
            Side::Response => st.response = Some(c),
        }
        Self::run_if_ready(st);
    }

    /// Sets what runs once the request's copy (and, `with_response`, the
    /// response's) is in; at once if they already are.
    pub fn then(&self, with_response: bool, f: Completion) {
        let mut st = self.0.lock().unwrap_or_else(|e| e.into_inner());
        st.with_response = with_response;
        st.then = Some(f);
        Self::run_if_ready(st);
    }

    fn run_if_ready(mut st: std::sync::MutexGuard<'_, MeetState>) {
        let ready = st.then.is_some()
            && st.request.is_some()
            && (!st.with_response || st.response.is_some());
        if !ready {
            return;
        }
        let (Some(f), Some(rq)) = (st.then.take(), st.request.take()) else {
            return;
        };
        let rs = st.response.take();
        // Run without the lock: the completion writes the record.
        drop(st);
        f(rq, rs);
    }
}

/// A body that passes every frame through unchanged and keeps the first
/// `cap` bytes for the record.
pub struct Tap<B> {
    inner: B,
    cap: usize,
    seen: Captured,
    captured: Vec<u8>,
    /// Where the copy goes, once.
    tx: Option<(Arc<Meet>, Side)>,
    /// The declared length (Content-Length), when there is one: hyper
    /// may drop a body once that many bytes are written, without polling
    /// it to its end.
    expected: Option<u64>,
}

impl<B: Body> Tap<B> {
    /// A tap whose copy goes to the exchange's meeting point.
    pub fn meeting(inner: B, cap: usize, meet: Arc<Meet>, side: Side) -> Self {
        Tap {
            expected: inner.size_hint().exact(),
            inner,
            cap,
            seen: Captured::default(),
            captured: Vec::new(),
            tx: Some((meet, side)),
        }
    }
}

impl<B> Tap<B> {
    fn finish(&mut self, complete: bool) {
        if let Some((meet, side)) = self.tx.take() {
            let mut seen = std::mem::take(&mut self.seen);
            seen.body.set_bytes(std::mem::take(&mut self.captured));
            seen.body.complete = complete;
            meet.deliver(side, seen);
        }
    }
}

impl<B> Body for Tap<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen.body.size += data.len() as u64;
                    let room = this.cap.saturating_sub(this.captured.len());
                    if data.len() > room {
                        this.seen.body.truncated = true;
                    }
                    this.captured
                        .extend_from_slice(&data[..room.min(data.len())]);
                } else if let Some(t) = frame.trailers_ref() {
                    this.seen.trailers = headers(t);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // Preserves Content-Length on the other side.
        self.inner.size_hint()
    }
}

impl<B> Drop for Tap<B> {
    fn drop(&mut self) {
        // A body never polled because it was empty, or dropped with all
        // its declared bytes seen, is complete; anything else dropped
        // before its end was cut short.
        let size = self.seen.body.size;
        let complete = size == 0 || self.expected == Some(size);
        self.finish(complete);
    }
}

/// Most of a refused request's body read and thrown away, off the
/// exchange: a client still uploading when the refusal comes (HTTP/2: the
/// response ends the stream while its DATA is in flight) must read the
/// refusal, not a stream reset or a connection closed under it. Bounded so
/// a refused job cannot keep the node reading.
pub fn discard<B>(body: B)
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
{
    const MOST: u64 = 1 << 20;
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut body = body;
        let mut read = 0u64;
        let within = tokio::time::sleep(std::time::Duration::from_secs(5));
        tokio::pin!(within);
        while read < MOST {
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            read += bytes::Buf::remaining(d) as u64;
                        }
                    }
                    _ => break,
                },
                _ = &mut within => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// The completion runs once, with both copies, whichever of the two
    /// bodies (and the completion itself) comes last.
    #[tokio::test]
    async fn meet_completes_once_both_bodies_are_in_whatever_the_order() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for order in 0..3 {
            let meet = Meet::new();
            let runs = Arc::new(AtomicUsize::new(0));
            let seen = Arc::new(std::sync::Mutex::new((0u64, 0u64)));
            let (r2, s2) = (runs.clone(), seen.clone());
            let then: Completion = Box::new(move |rq, rs| {
                r2.fetch_add(1, Ordering::SeqCst);
                *s2.lock().unwrap() = (rq.body.size, rs.map_or(0, |r| r.body.size));
            });
            let req = Tap::meeting(
                Full::new(Bytes::from_static(b"abc")),
                10,
                meet.clone(),
                Side::Request,
            );
            let resp = Tap::meeting(
                Full::new(Bytes::from_static(b"hello")),
                10,
                meet.clone(),
                Side::Response,
            );
            match order {
                0 => {
                    meet.then(true, then);
                    req.collect().await.unwrap();
                    assert_eq!(runs.load(Ordering::SeqCst), 0, "not before the response");
                    resp.collect().await.unwrap();
                }
                1 => {
                    resp.collect().await.unwrap();
                    meet.then(true, then);
                    assert_eq!(runs.load(Ordering::SeqCst), 0, "not before the request");
                    req.collect().await.unwrap();
                }
                _ => {
                    req.collect().await.unwrap();
                    resp.collect().await.unwrap();
                    meet.then(true, then);
                }
            }
            assert_eq!(runs.load(Ordering::SeqCst), 1, "order {order}");
            assert_eq!(*seen.lock().unwrap(), (3, 5), "order {order}");
        }
        // Request only (the upstream failed): no response is waited for;
        // a body dropped unread still delivers its copy.
        let meet = Meet::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let r2 = runs.clone();
        let req = Tap::meeting(
            Full::new(Bytes::from_static(b"abc")),
            10,
            meet.clone(),
            Side::Request,
        );
        meet.then(
            false,
            Box::new(move |rq, rs| {
                assert!(rs.is_none());
                assert_eq!(rq.body.size, 0, "dropped unread");
                r2.fetch_add(1, Ordering::SeqCst);
            }),
        );
        drop(req);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// A request-side tap whose copy lands in the returned slot.
    fn tapped<B: Body>(body: B) -> (Tap<B>, Arc<std::sync::Mutex<Option<Captured>>>) {
        let meet = Meet::new();
        let slot = Arc::new(std::sync::Mutex::new(None));
        let into = slot.clone();
        meet.then(
            false,
            Box::new(move |rq, _| *into.lock().unwrap() = Some(rq)),
        );
        (Tap::meeting(body, 100, meet, Side::Request), slot)
    }

    #[tokio::test]
    async fn tap_passes_everything_and_caps_the_copy() {
        let data = Bytes::from(vec![b'a'; 1000]);
        let (tap, copy) = tapped(Full::new(data.clone()));
        let out = tap.collect().await.unwrap().to_bytes();
        assert_eq!(out, data, "the body is forwarded unchanged");
        let c = copy.lock().unwrap().take().unwrap();
        assert_eq!(c.body.size, 1000);
        assert!(c.body.truncated);
        assert!(c.body.complete);
        assert_eq!(c.body.text.as_deref().map(str::len), Some(100));
    }

    /// A Content-Length body in two chunks that only says it ended when
    /// polled once more (as hyper's incoming bodies do).
    struct Chunks(Vec<&'static [u8]>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0.is_empty() {
                return Poll::Ready(None);
            }
            let c = self.0.remove(0);
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(c)))))
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(6)
        }
    }

    #[tokio::test]
    async fn a_body_dropped_after_its_declared_length_is_complete() {
        let (mut tap, copy) = tapped(Chunks(vec![b"abc", b"def"]));
        tap.frame().await.unwrap().unwrap();
        tap.frame().await.unwrap().unwrap();
        drop(tap); // the server stopped polling: Content-Length reached
        assert!(copy.lock().unwrap().take().unwrap().body.complete);
        let (mut tap, copy) = tapped(Chunks(vec![b"abc", b"def"]));
        tap.frame().await.unwrap().unwrap();
        drop(tap); // cut short
        assert!(!copy.lock().unwrap().take().unwrap().body.complete);
    }
}
