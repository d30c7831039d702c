//! The standard gRPC health service (`grpc.health.v1.Health/Check`) on the client listener,
//! so that load balancers, service meshes, Kubernetes' `grpc` probes and `grpc_health_probe`
//! can check the sidecar where clients reach it. The sidecar answers it itself: without
//! credentials (probes carry none), without a record (a probe is not a Milvus call), and
//! with the same verdict as `/readyz` ([`Readiness`]).

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use prost::Message;
use tonic::Status;

use super::Body;
use super::grpc::{self, MessageError};
use crate::readiness::Readiness;
use crate::telemetry::{HealthAnswer, Metrics};

pub const SERVICE_PATH: &str = "/grpc.health.v1.Health/";

/// The services a check may name: "" (the server as a whole, what probes ask by default)
/// and the one the sidecar serves.
const SERVICES: [&str; 2] = ["", "milvus.proto.milvus.MilvusService"];

/// A probe of the upstream this recent answers a check, so that probes from many load
/// balancers (or anyone: no credentials are needed) make at most one call to Milvus a second.
const RECENT: Duration = Duration::from_secs(1);

/// How long the request may take to arrive when the caller set no deadline.
const READ_WITHIN: Duration = Duration::from_secs(10);

/// A request holds a service name; anything this large is not a health check.
const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Clone, PartialEq, Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

#[derive(Clone, PartialEq, Message)]
struct HealthCheckResponse {
    /// `grpc.health.v1.HealthCheckResponse.ServingStatus`, an enum: a varint on the wire.
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// Answers a call whose path starts with [`SERVICE_PATH`].
pub async fn answer(
    request: Request<Incoming>,
    readiness: &Readiness,
    metrics: &Metrics,
    started: Instant,
) -> Response<Body> {
    let verdict = match request.uri().path().strip_prefix(SERVICE_PATH) {
        Some("Check") => check(request, readiness, started).await,
        // The health-checking protocol has clients treat UNIMPLEMENTED on Watch as "no
        // health checking": they keep using the server.
        Some("Watch") => Err(Status::unimplemented(
            "milvus-sidecar answers grpc.health.v1.Health/Check, not Watch; the sidecar counts as healthy",
        )),
        other => {
            Err(Status::unimplemented(format!("grpc.health.v1.Health has no method {:?}", other.unwrap_or_default())))
        }
    };
    match verdict {
        Ok(status) => {
            metrics.health_checked(if status == SERVING { HealthAnswer::Serving } else { HealthAnswer::NotServing });
            serving_status(status)
        }
        Err(refusal) => {
            metrics.health_checked(HealthAnswer::Refused);
            tracing::debug!(code = ?refusal.code(), message = refusal.message(), "health check refused");
            refusal.into_http()
        }
    }
}

async fn check(request: Request<Incoming>, readiness: &Readiness, started: Instant) -> Result<i32, Status> {
    let (parts, body) = request.into_parts();
    let within = grpc::timeout(&parts.headers).unwrap_or(READ_WITHIN);
    let read = Limited::new(body, MAX_REQUEST_BYTES).collect();
    let bytes = match tokio::time::timeout_at((started + within).into(), read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<LengthLimitError>() => {
            return Err(Status::invalid_argument(format!(
                "a health check request holds a service name; this one is over {MAX_REQUEST_BYTES} bytes"
            )));
        }
        Ok(Err(e)) => {
            return Err(Status::cancelled(format!("the client went away before its request was complete: {e}")));
        }
        Err(_) => return Err(Status::deadline_exceeded(format!("the request was not complete within {within:?}"))),
    };
    let message = grpc::first_message(&bytes, parts.headers.get(grpc::GRPC_ENCODING), MAX_REQUEST_BYTES).map_err(
        |e| match e {
            MessageError::Unsupported(encoding) => {
                Status::unimplemented(format!("the sidecar cannot read {encoding:?}-compressed messages"))
            }
            MessageError::Truncated => Status::invalid_argument("truncated gRPC message"),
            MessageError::TooLarge => Status::invalid_argument("health check request too large"),
            MessageError::Corrupt(reason) => Status::invalid_argument(reason),
        },
    )?;
    let service = HealthCheckRequest::decode(&*message)
        .map_err(|e| Status::invalid_argument(format!("not a grpc.health.v1.HealthCheckRequest: {e}")))?
        .service;
    if !SERVICES.contains(&service.as_str()) {
        return Err(Status::not_found(format!(
            "unknown service {service:?}: the sidecar reports on \"\" (itself) and {:?}",
            SERVICES[1]
        )));
    }
    if readiness.draining() {
        return Ok(NOT_SERVING);
    }
    match readiness.upstream(RECENT).await {
        Ok(()) => Ok(SERVING),
        Err(reason) => {
            tracing::debug!(%reason, "health check: NOT_SERVING, the upstream Milvus does not answer");
            Ok(NOT_SERVING)
        }
    }
}

fn serving_status(status: i32) -> Response<Body> {
    let data = grpc::frame(&HealthCheckResponse { status }.encode_to_vec());
    let mut trailers = HeaderMap::new();
    trailers.insert(grpc::GRPC_STATUS, HeaderValue::from_static("0"));
    let mut response = Response::new(Body::Complete { data: Some(data), receipt: None, trailers: Some(trailers) });
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}
