//! Bodies: the boxed body type both directions use, a wrapper that keeps a
//! guard alive until a body is done, and the `--sign-payload` buffering.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{
    BodyExt as _, Full, LengthLimitError, Limited, StreamBody, combinators::UnsyncBoxBody,
};
use pin_project_lite::pin_project;

use super::errors::RequestError;
use crate::sign::Payload;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body with errors convertible to [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project! {
    /// Holds `guard` until the body ends or is dropped.
    pub struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: Option<G>,
    }
}

impl<B, G> Guarded<B, G> {
    pub fn new(inner: B, guard: G) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: Body, G> Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = r {
            this.guard.take();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a whole request body of at most `limit` bytes for `--sign-payload`
/// and returns it (trailers kept) with its SHA-256.
pub async fn buffer_for_signing<B>(
    body: B,
    content_length: Option<u64>,
    limit: u64,
) -> Result<(ProxyBody, Payload), RequestError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if content_length.is_some_and(|n| n > limit) {
        return Err(RequestError::BodyTooLarge { limit });
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    let collected = Limited::new(body, limit_usize)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                RequestError::BodyTooLarge { limit }
            } else {
                RequestError::ReadBody(e)
            }
        })?;
    let trailers: Option<HeaderMap> = collected.trailers().cloned();
    let bytes = collected.to_bytes();
    let payload = Payload::sha256_of(&bytes);
    let body = match trailers {
        None => boxed(Full::new(bytes)),
        Some(t) => {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(bytes)), Ok(Frame::trailers(t))];
            StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
        }
    };
    Ok((body, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_and_hashes() {
        let (body, payload) = buffer_for_signing(Full::new(Bytes::from_static(b"hello")), None, 5)
            .await
            .unwrap();
        assert_eq!(
            payload,
            Payload::Sha256Hex(
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into()
            )
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }

    #[tokio::test]
    async fn over_limit_is_413() {
        let e = buffer_for_signing(Full::new(Bytes::from_static(b"hello!")), None, 5)
            .await
            .unwrap_err();
        assert!(matches!(e, RequestError::BodyTooLarge { limit: 5 }));
        let e = buffer_for_signing(Full::new(Bytes::new()), Some(6), 5)
            .await
            .unwrap_err();
        assert_eq!(e.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
