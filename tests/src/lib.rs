//! Integration-test harness for `dsql-proxy`.
//!
//! Everything here drives real components: throwaway PostgreSQL servers
//! started from the installed server binaries, a real CA generated with
//! rcgen, real TLS (rustls, aws-lc-rs provider) and the real `dsql-proxy` binary.
//!
//! The harness is written for Linux CI containers, which commonly run as
//! root; PostgreSQL refuses to run as root, so server processes are started
//! as the `postgres` OS user in that case.

pub mod aws_endpoints;
mod build;
pub mod dsql_stack;
pub mod emulator;
pub mod fixture;
pub mod global;
pub mod latency;
pub mod metrics;
pub mod moto;
pub mod net;
pub mod pg;
pub mod pki;
pub mod process;
pub mod proxy;
pub mod rds;
pub mod regions;
pub mod replication;
pub mod route53;
pub mod wire;

pub use emulator::{emulator_binary, EmulatorOptions, EmulatorProcess};
pub use fixture::{probe_login, proxy_toml, ProxyOptions, Stack};
pub use latency::{LatencyRelay, RelayMode};
pub use metrics::Scrape;
pub use net::{free_addr, free_port, wait_for_port};
pub use pg::{
    connect_with, AuthMethod, PgOptions, PgServer, ADMIN_PASSWORD, ADMIN_USER, APP_DB,
    APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER, SUPERUSER, TLS_DNS_NAMES,
};
pub use pki::{ServerCert, TestPki};
pub use proxy::{proxy_binary, run_proxy_cmd, run_proxy_cmd_with_env, ProxyProcess};
pub use regions::{Region, RegionsOptions, RegionsStack};
pub use replication::Replication;
