//! A PostgreSQL server with the proxy in front of it, configured as tests
//! usually need: TLS on the backend leg, plain TCP on the client leg.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config};

use crate::{
    free_addr, AuthMethod, PgOptions, PgServer, ProxyProcess, APP_DB, APP_PASSWORD, APP_USER,
};

/// What goes into the proxy's config besides the server's address.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// `[backend] auth`.
    pub auth: &'static str,
    /// `[backend] password` when `auth = "password"`.
    pub password: Option<String>,
    /// `[backend] tls`.
    pub tls: &'static str,
    /// The endpoint's `host` (SNI and certificate name); the proxy dials the
    /// server's real address through `connect_address`.
    pub host: String,
    /// Extra lines for `[listen]` and `[backend]`.
    pub listen_extra: Vec<String>,
    pub backend_extra: Vec<String>,
    /// Replaces the endpoint's connect address (for unreachable tests).
    pub connect_address: Option<SocketAddr>,
    /// The `[routing]` table's first lines (the table comes last, so a
    /// caller may append more keys): by default the probe logs in as
    /// [`APP_USER`], whose password `password` is.
    pub routing: Vec<String>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            auth: "password",
            password: Some(APP_PASSWORD.to_string()),
            tls: "verify-full",
            host: "db.test.internal".into(),
            listen_extra: Vec::new(),
            backend_extra: Vec::new(),
            connect_address: None,
            routing: probe_login(APP_USER),
        }
    }
}

/// `[routing]` lines for a probe that logs in as `user` (with the
/// backend's password), so it keeps one connection open instead of
/// reconnecting, refused, every interval.
pub fn probe_login(user: &str) -> Vec<String> {
    vec![
        format!("probe_user = \"{user}\""),
        format!("probe_database = \"{APP_DB}\""),
    ]
}

/// Renders a proxy config for `pg`, listening on `listen`. It ends in its
/// `[routing]` table (the probe login), so more routing keys can be
/// appended.
pub fn proxy_toml(pg: &PgServer, listen: SocketAddr, opts: &ProxyOptions) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "[listen]\naddress = \"{listen}\"\nstartup_timeout = \"3s\"\n"
    ));
    for l in &opts.listen_extra {
        s.push_str(l);
        s.push('\n');
    }
    // The admin port is not served yet, but keep it off the default.
    s.push_str(&format!("[admin]\naddress = \"{}\"\n", free_addr()));
    s.push_str(&format!(
        "[backend]\nkind = \"postgres\"\nauth = \"{}\"\ntls = \"{}\"\nconnect_timeout = \"2s\"\n",
        opts.auth, opts.tls
    ));
    if let Some(pw) = &opts.password {
        s.push_str(&format!("password = \"{pw}\"\n"));
    }
    if let Some(ca) = pg.ca_file() {
        s.push_str(&format!("ca_file = \"{}\"\n", ca.display()));
    }
    for l in &opts.backend_extra {
        s.push_str(l);
        s.push('\n');
    }
    let connect = opts.connect_address.unwrap_or(pg.addr());
    s.push_str(&format!(
        "[[endpoints]]\nname = \"local-1\"\nregion = \"test-1\"\nhost = \"{}\"\nport = {}\nconnect_address = \"{connect}\"\n",
        opts.host,
        pg.port()
    ));
    // Last, so callers can append more [routing] keys.
    s.push_str("[routing]\n");
    for l in &opts.routing {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// A server plus the proxy in front of it.
pub struct Stack {
    pub proxy: ProxyProcess,
    pub listen: SocketAddr,
    // Dropped last: the proxy goes first so it never sees the server vanish.
    pub pg: PgServer,
}

impl Stack {
    /// A TLS + SCRAM server and a proxy with default options.
    pub fn start() -> Stack {
        Self::start_with(
            PgOptions {
                tls: true,
                auth: AuthMethod::ScramSha256,
                ..PgOptions::default()
            },
            ProxyOptions::default(),
        )
    }

    pub fn start_with(pg_opts: PgOptions, opts: ProxyOptions) -> Stack {
        let pg = PgServer::start(pg_opts);
        let listen = free_addr();
        let proxy = ProxyProcess::start_with(&proxy_toml(&pg, listen, &opts), listen);
        Stack { proxy, listen, pg }
    }

    /// Client settings for the proxy's plain TCP listener.
    pub fn client_config(&self, user: &str, dbname: &str) -> Config {
        client_config(self.listen, user, dbname)
    }

    /// Connects through the proxy; panics with both logs on failure.
    pub async fn connect(&self, user: &str, dbname: &str) -> Client {
        match crate::connect_with(&self.client_config(user, dbname), None).await {
            Ok(c) => c,
            Err(e) => panic!(
                "connect through proxy failed: {e:?}\n--- proxy log ---\n{}\n--- server log ---\n{}",
                self.proxy.logs(),
                self.pg.log_contents()
            ),
        }
    }

    /// A `psql` command aimed at the proxy.
    pub fn psql(&self, user: &str, dbname: &str) -> std::process::Command {
        let mut cmd = self.pg.psql_command();
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.listen.port().to_string())
            .env("PGUSER", user)
            .env("PGDATABASE", dbname)
            .env("PGSSLMODE", "disable")
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-v", "ON_ERROR_STOP=1"]);
        cmd
    }
}

/// Plain-TCP client settings for a proxy listening on `listen`.
pub fn client_config(listen: SocketAddr, user: &str, dbname: &str) -> Config {
    let mut cfg = Config::new();
    cfg.host("127.0.0.1")
        .port(listen.port())
        .user(user)
        .dbname(dbname)
        .ssl_mode(SslMode::Disable)
        .connect_timeout(Duration::from_secs(10));
    cfg
}
