//! The body of every answer the gateway sends: the upstream's, streamed, or its own.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

use super::h1::RelayedHeaders;
use super::pool::UpstreamBody;
use super::BoxError;

/// An answer's body. A forwarded answer meant for the gateway's own HTTP/1.1 writer also
/// carries the upstream's header lines as they came ([`RelayedHeaders`]): they travel with
/// the body because the writer is the only one to read them (the answer's header map then
/// holds only what the gateway adds, such as `X-Request-Id`).
///
/// Two words: an answer is moved through every layer of the stack, and the upstream's
/// body is boxed once, as any other body is.
pub struct Body(Kind);

enum Kind {
    Upstream(Box<Forwarded>),
    Other(UnsyncBoxBody<Bytes, BoxError>),
}

struct Forwarded {
    body: UpstreamBody,
    relayed: Option<RelayedHeaders>,
}

impl Body {
    pub fn new<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body(Kind::Other(body.map_err(Into::into).boxed_unsync()))
    }

    /// An upstream answer's body, with its header lines when they were kept as lines.
    pub fn forwarded(body: UpstreamBody, relayed: Option<RelayedHeaders>) -> Self {
        Body(Kind::Upstream(Box::new(Forwarded { body, relayed })))
    }

    /// The upstream's header lines, for the writer (taken once).
    pub fn take_relayed(&mut self) -> Option<RelayedHeaders> {
        match &mut self.0 {
            Kind::Upstream(forwarded) => forwarded.relayed.take(),
            Kind::Other(_) => None,
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Kind::Upstream(forwarded) => Pin::new(&mut forwarded.body)
                .poll_frame(cx)
                .map_err(BoxError::from),
            Kind::Other(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Upstream(forwarded) => forwarded.body.is_end_stream(),
            Kind::Other(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Upstream(forwarded) => forwarded.body.size_hint(),
            Kind::Other(body) => body.size_hint(),
        }
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Kind::Upstream(forwarded) => f
                .debug_struct("Body::Upstream")
                .field("relayed", &forwarded.relayed)
                .finish_non_exhaustive(),
            Kind::Other(_) => f.write_str("Body::Other"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_two_words() {
        assert_eq!(
            std::mem::size_of::<Body>(),
            2 * std::mem::size_of::<usize>()
        );
    }
}
