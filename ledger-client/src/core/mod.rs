//! The protocol logic of the ledger client, kept apart from I/O and time so that the simulation
//! test (`tests/simulation.rs`) can drive it through many seeded schedules: [`quorum`] arithmetic,
//! the writer's [`write::WriteCore`] and the [`recovery::RecoveryCore`].

pub mod quorum;
pub mod recovery;
pub mod write;
