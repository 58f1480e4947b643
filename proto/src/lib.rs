//! Quire's wire types, shared by every crate: the generated gRPC services and messages, the
//! entry format that clients write and bookies store ([`entry`]), and the one place where stable
//! error codes are mapped to and from `tonic::Status` ([`status`]).

pub mod entry;
pub mod status;

/// The bookie API, generated from `proto/quire/bookie/v1/bookie.proto`.
pub mod bookie {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quire.bookie.v1");
}

/// The metadata API, generated from `proto/quire/metadata/v1/metadata.proto`.
pub mod metadata {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quire.metadata.v1");
}

/// The ledger API for applications, generated from `proto/quire/ledger/v1/ledger.proto`.
pub mod ledger {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quire.ledger.v1");
}

/// The stream API, generated from `proto/quire/stream/v1/stream.proto`.
pub mod stream {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quire.stream.v1");
}

/// The table API, generated from `proto/quire/table/v1/table.proto`.
pub mod table {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("quire.table.v1");
}

pub use bookie::StatusCode;
