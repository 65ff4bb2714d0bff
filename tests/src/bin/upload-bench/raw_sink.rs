//! The receiving end of `upload-bench flush`: SkyWalking's `collectProfilingData` served by
//! tonic over HTTP/2 like the OAP, keeping each message's bytes as they arrive and decoding them
//! only when asked (`check`), after the flush was timed.
//!
//! The fake OAP decodes every message as it arrives, into tens of thousands of strings per flush;
//! on this two-core machine that decoding (about 60 ms of CPU for a 10 MiB window) would be timed
//! as the agent's sending, while a real OAP decodes on a machine of its own.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use prost::Message as _;
use prost::bytes::{Buf as _, Bytes};
use rover_proto::v3::Commands;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::{ClientStreamingService, Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

/// One `collectProfilingData` stream: its messages, undecoded, and how it ended.
#[derive(Default)]
pub struct RawStream {
    pub messages: Vec<Bytes>,
    /// The client closed it and the sink replied.
    pub completed: bool,
    pub error: Option<String>,
}

/// `skywalking.v3.EBPFProfilingService` with only `collectProfilingData`; other methods are
/// answered `UNIMPLEMENTED`.
#[derive(Clone, Default)]
pub struct RawProfilingSink {
    streams: Arc<Mutex<Vec<RawStream>>>,
}

impl RawProfilingSink {
    /// The streams received since the last call.
    pub fn take(&self) -> Vec<RawStream> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RawStream>> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl NamedService for RawProfilingSink {
    const NAME: &'static str = "skywalking.v3.EBPFProfilingService";
}

impl Service<http::Request<Body>> for RawProfilingSink {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            if request.uri().path() == "/skywalking.v3.EBPFProfilingService/collectProfilingData" {
                Ok(Grpc::new(RawCodec).client_streaming(sink, request).await)
            } else {
                Ok(Status::unimplemented(request.uri().path().to_owned()).into_http())
            }
        })
    }
}

impl ClientStreamingService<Bytes> for RawProfilingSink {
    type Response = Commands;
    type Future = BoxFuture<Response<Commands>, Status>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let sink = self.clone();
        Box::pin(async move {
            let index = {
                let mut streams = sink.lock();
                streams.push(RawStream::default());
                streams.len() - 1
            };
            let mut stream = request.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(message)) => sink.lock()[index].messages.push(message),
                    Ok(None) => break,
                    Err(status) => {
                        sink.lock()[index].error = Some(status.to_string());
                        return Err(status);
                    }
                }
            }
            sink.lock()[index].completed = true;
            Ok(Response::new(Commands::default()))
        })
    }
}

/// Takes each message's bytes as they are; answers with prost.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Commands;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for RawCodec {
    type Item = Commands;
    type Error = Status;

    fn encode(&mut self, item: Commands, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|error| Status::internal(error.to_string()))
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let length = src.remaining();
        Ok(Some(src.copy_to_bytes(length)))
    }
}
