//! The Observer service as the relay serves it: GetFlows sends the merged
//! responses as the nodes encoded them (`raw`); every other method goes
//! to the generated server.

use std::pin::Pin;
use std::sync::Arc;

use hubble::entry::Encoded;
use proto::observer::observer_server::ObserverServer;
use proto::observer::GetFlowsRequest;
use tonic::{Request, Response, Status};

use crate::service::Relay;

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

pub struct Routes {
    relay: Arc<Relay>,
    generated: ObserverServer<Relay>,
}

impl Routes {
    pub fn new(relay: Arc<Relay>) -> Self {
        Routes {
            generated: ObserverServer::from_arc(relay.clone()),
            relay,
        }
    }
}

impl Clone for Routes {
    fn clone(&self) -> Self {
        Routes {
            relay: self.relay.clone(),
            generated: self.generated.clone(),
        }
    }
}

impl tonic::server::NamedService for Routes {
    const NAME: &'static str = "observer.Observer";
}

struct RawGetFlows(Arc<Relay>);

impl tonic::server::ServerStreamingService<GetFlowsRequest> for RawGetFlows {
    type Response = Encoded;
    type ResponseStream = BoxStream<Encoded>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<GetFlowsRequest>) -> Self::Future {
        let relay = self.0.clone();
        Box::pin(async move {
            let raw = relay.get_flows_raw(request.into_inner()).await?;
            let encoded = tokio_stream::StreamExt::map(raw, |r| r.map(|r| Encoded(r.bytes)));
            Ok(Response::new(Box::pin(encoded) as BoxStream<Encoded>))
        })
    }
}

impl<Body> tonic::codegen::Service<tonic::codegen::http::Request<Body>> for Routes
where
    Body: tonic::codegen::Body + Send + 'static,
    Body::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<tonic::codegen::http::Request<Body>>::poll_ready(
            &mut self.generated,
            cx,
        )
    }

    fn call(&mut self, req: tonic::codegen::http::Request<Body>) -> Self::Future {
        if req.uri().path() != "/observer.Observer/GetFlows" {
            return self.generated.call(req);
        }
        let method = RawGetFlows(self.relay.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Encoded, GetFlowsRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .server_streaming(method, req)
                .await)
        })
    }
}
