//! Flows: datapath events turned into Hubble-shaped records, filters over
//! them, the fixed-capacity flow ring, and Hubble's text formats.
#![forbid(unsafe_code)]

pub mod agent_event;
pub mod enums;
pub mod format;
pub mod metrics;
pub mod record;
pub mod ring;
pub mod text;

pub use record::{Endpoint, Flow, Workload};
pub use ring::Ring;
