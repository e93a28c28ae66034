//! The PostgreSQL wire protocol as `dsql-proxy` needs it, with no I/O.
//!
//! Everything here works on byte slices and `BytesMut` so it can be unit
//! tested and fuzzed. Where `pgwire`'s message types fit the startup and
//! authentication phase they are used for encoding; decoding of anything that
//! came from the network is done here, with explicit length checks, because a
//! peer's bytes must never be able to panic the proxy.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod md5;
pub mod messages;
pub mod query;
pub mod relay;
pub mod retry;
pub mod scram;
pub mod sqlstate;
pub mod startup;
pub mod tracking;

pub use error::ProtocolError;
pub use frame::RawMessage;
pub use messages::PgError;
pub use startup::{CancelKey, InitialPacket, ProtocolVersion, StartupMessage};
