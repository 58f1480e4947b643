//! Tables (being written).

pub mod codec;
pub mod model;
pub mod state;

pub use model::*;
