//! Stable Quire error codes on the wire.
//!
//! Unary RPCs fail with a `tonic::Status` whose `x-quire-code` metadata holds the numeric
//! [`StatusCode`]; the gRPC code is chosen to match (so generic gRPC clients see something sensible)
//! but only the Quire code is authoritative. This module is the only place that maps the two.

use crate::StatusCode;

/// Metadata key carrying the numeric [`StatusCode`] of a failed call.
pub const CODE_KEY: &str = "x-quire-code";

/// Builds the `tonic::Status` for a Quire error code.
pub fn to_status(code: StatusCode, message: impl Into<String>) -> tonic::Status {
    let grpc = match code {
        StatusCode::Ok => tonic::Code::Ok,
        StatusCode::NoSuchLedger | StatusCode::NoSuchEntry => tonic::Code::NotFound,
        StatusCode::Fenced | StatusCode::ReadOnly => tonic::Code::FailedPrecondition,
        StatusCode::Unauthorized => tonic::Code::PermissionDenied,
        StatusCode::TooLarge | StatusCode::BadRequest => tonic::Code::InvalidArgument,
        StatusCode::TooManyRequests => tonic::Code::ResourceExhausted,
        StatusCode::IoError => tonic::Code::Internal,
        StatusCode::Corruption => tonic::Code::DataLoss,
        StatusCode::ShuttingDown => tonic::Code::Unavailable,
    };
    let mut status = tonic::Status::new(grpc, message);
    let value = (code as i32).to_string();
    if let Ok(v) = value.parse() {
        status.metadata_mut().insert(CODE_KEY, v);
    }
    status
}

/// Reads the Quire code of a failed call. A status without one (a transport failure, or a peer
/// that is not Quire) maps to [`StatusCode::IoError`].
pub fn code_of(status: &tonic::Status) -> StatusCode {
    status
        .metadata()
        .get(CODE_KEY)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .and_then(|n| StatusCode::try_from(n).ok())
        .unwrap_or(StatusCode::IoError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_status() {
        for n in 1..=11 {
            let code = StatusCode::try_from(n).expect("known code");
            let status = to_status(code, "boom");
            assert_eq!(code_of(&status), code);
            assert_eq!(status.message(), "boom");
        }
    }

    #[test]
    fn foreign_status_is_io_error() {
        assert_eq!(
            code_of(&tonic::Status::unavailable("x")),
            StatusCode::IoError
        );
    }
}
