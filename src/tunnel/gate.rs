//! Back-pressure between a tunnel's legs.
//!
//! `actix::io::SinkWrite` queues without bound. A [`Gate`] counts the payload bytes queued
//! toward one leg; while more than `max_buffer` wait, the *other* leg's input stream is not
//! polled, so TCP back-pressure reaches the sender instead of the gateway's memory. It lives
//! on the tunnel's worker thread (`Rc`/`Cell`: no atomics, no locks on the relay path).

use std::cell::Cell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_http::ws::{Item, Message};
use futures_util::{Sink, Stream};

struct Inner {
    queued: Cell<usize>,
    high: usize,
    blocked_reader: Cell<Option<Waker>>,
}

/// The byte count queued toward one leg, shared by the writer and the gated reader.
#[derive(Clone)]
pub struct Gate(Rc<Inner>);

impl Gate {
    pub fn new(max_buffer: usize) -> Self {
        Gate(Rc::new(Inner {
            queued: Cell::new(0),
            high: max_buffer,
            blocked_reader: Cell::new(None),
        }))
    }

    /// `msg` was queued toward this leg.
    #[inline]
    pub fn add(&self, msg: &Message) {
        self.0.queued.set(self.0.queued.get() + weight(msg));
    }

    #[inline]
    fn sub(&self, msg: &Message) {
        let queued = self.0.queued.get().saturating_sub(weight(msg));
        self.0.queued.set(queued);
        // Resume the reader at half the limit, not at the limit, so it is not woken for
        // every frame while the leg is slow.
        if queued <= self.0.high / 2
            && let Some(waker) = self.0.blocked_reader.take()
        {
            waker.wake();
        }
    }
}

#[inline]
fn weight(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Continuation(Item::FirstText(b) | Item::FirstBinary(b))
        | Message::Continuation(Item::Continue(b) | Item::Last(b)) => b.len(),
        Message::Close(_) | Message::Nop => 0,
    }
}

/// A sink that gives its gate back the bytes of each item it takes.
pub struct GatedSink<S> {
    inner: S,
    gate: Gate,
}

impl<S> GatedSink<S> {
    pub fn new(inner: S, gate: Gate) -> Self {
        GatedSink { inner, gate }
    }
}

impl<S: Sink<Message> + Unpin> Sink<Message> for GatedSink<S> {
    type Error = S::Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.inner).poll_ready(cx)
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), S::Error> {
        self.gate.sub(&item);
        Pin::new(&mut self.inner).start_send(item)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A stream that stops yielding while the gate of the leg it feeds is over its limit, and
/// ends after its first error (a codec that failed once would fail again on the same bytes).
pub struct GatedStream<S> {
    inner: S,
    gate: Gate,
    failed: bool,
}

impl<S> GatedStream<S> {
    pub fn new(inner: S, gate: Gate) -> Self {
        GatedStream {
            inner,
            gate,
            failed: false,
        }
    }
}

impl<S, T, E> Stream for GatedStream<S>
where
    S: Stream<Item = Result<T, E>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let inner = &self.gate.0;
        if inner.queued.get() > inner.high {
            inner.blocked_reader.set(Some(cx.waker().clone()));
            return Poll::Pending;
        }
        let item = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Err(_))) = &item {
            self.failed = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt, stream};

    #[tokio::test]
    async fn reader_pauses_over_the_limit_and_resumes_at_half() {
        let gate = Gate::new(10);
        let mut reader = GatedStream::new(stream::iter((0..100).map(Ok::<i32, ()>)), gate.clone());
        assert_eq!(reader.next().await, Some(Ok(0)));
        let big = Message::Binary(Bytes::from_static(&[0; 11]));
        gate.add(&big);
        assert_eq!(gate.0.queued.get(), 11);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut reader).poll_next(&mut cx).is_pending());

        let mut sink = GatedSink::new(futures_util::sink::drain(), gate.clone());
        sink.send(big).await.unwrap();
        assert_eq!(gate.0.queued.get(), 0);
        assert_eq!(reader.next().await, Some(Ok(1)));
    }
}

#[cfg(test)]
mod fuse_tests {
    use super::*;
    use futures_util::{StreamExt, stream};

    #[tokio::test]
    async fn stream_ends_after_its_first_error() {
        let items = stream::iter([Ok(1), Err("bad"), Ok(2)]);
        let mut reader = GatedStream::new(items, Gate::new(10));
        assert_eq!(reader.next().await, Some(Ok(1)));
        assert_eq!(reader.next().await, Some(Err("bad")));
        assert_eq!(reader.next().await, None);
    }
}
