//! Small id newtypes used across the control and data planes.
//!
//! They are plain integers on the wire; the newtypes keep a rank from being passed where an
//! expert id is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $inner:ty) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// Position of a worker in the world of one plan epoch (0..W).
    Rank,
    u32
);
id_type!(
    /// A logical routed expert (0..n_routed_experts), independent of where its replicas live.
    ExpertId,
    u32
);
id_type!(
    /// A sequence (one request) inside the scheduler.
    SeqId,
    u64
);
id_type!(
    /// A plan epoch; every membership or placement change makes a new one.
    Epoch,
    u64
);
