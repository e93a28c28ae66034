//! Simulated AWS Regions: several real PostgreSQL servers sharing one test
//! CA, each behind a [`LatencyRelay`] with its own delay, and the proxy in
//! front with one `[[endpoints]]` entry per Region.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;

use crate::fixture::client_config;
use crate::{
    connect_with, free_addr, LatencyRelay, PgServer, ProxyProcess, TestPki, APP_DB, APP_PASSWORD,
    APP_USER,
};

/// One simulated Region.
pub struct Region {
    pub name: String,
    pub relay: LatencyRelay,
    pub pg: PgServer,
}

#[derive(Clone, Debug)]
pub struct RegionsOptions {
    /// One entry per Region: (name, one-way delay each direction).
    pub regions: Vec<(&'static str, Duration)>,
    /// Lines for `[routing]`; the fixture already sets the probe login.
    pub routing: Vec<String>,
    /// Extra lines per endpoint (same order as `regions`).
    pub endpoint_extra: Vec<Vec<String>>,
    /// Extra lines for `[backend]`.
    pub backend_extra: Vec<String>,
    /// Environment for the proxy process (its inherited `AWS_*` are removed).
    pub env: Vec<(String, String)>,
    /// `[routing] probe_user`; [`APP_USER`] when `None`.
    pub probe_user: Option<String>,
}

impl Default for RegionsOptions {
    fn default() -> Self {
        Self {
            regions: vec![
                ("region-a", Duration::from_millis(5)),
                ("region-b", Duration::from_millis(25)),
            ],
            routing: Vec::new(),
            endpoint_extra: Vec::new(),
            backend_extra: Vec::new(),
            env: Vec::new(),
            probe_user: None,
        }
    }
}

pub struct RegionsStack {
    pub proxy: ProxyProcess,
    pub listen: SocketAddr,
    // Dropped after the proxy.
    pub regions: Vec<Region>,
}

impl RegionsStack {
    pub fn start(opts: RegionsOptions) -> RegionsStack {
        let pki = Arc::new(TestPki::new());
        let regions: Vec<Region> = opts
            .regions
            .iter()
            .map(|(name, delay)| {
                let pg = PgServer::start_tls_scram(&pki);
                let relay = LatencyRelay::start(pg.addr(), *delay);
                Region {
                    name: (*name).to_owned(),
                    relay,
                    pg,
                }
            })
            .collect();
        let listen = free_addr();
        let toml = regions_toml(&regions, listen, &opts, &pki);
        let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &opts.env);
        proxy.wait_ready(listen, Duration::from_secs(30));
        RegionsStack {
            proxy,
            listen,
            regions,
        }
    }

    pub fn region(&self, name: &str) -> &Region {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    pub fn region_mut(&mut self, name: &str) -> &mut Region {
        self.regions
            .iter_mut()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no region {name}"))
    }

    /// The proxy's admin address, from its config file.
    pub fn admin_addr(&self) -> SocketAddr {
        let toml = std::fs::read_to_string(self.proxy.config_path()).expect("read proxy config");
        let section = toml
            .split("[admin]")
            .nth(1)
            .expect("the config has an [admin] section");
        section
            .lines()
            .find_map(|l| l.trim().strip_prefix("address = "))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .expect("[admin] address")
    }

    /// Connects through the proxy as the app user.
    pub async fn try_connect(&self) -> Result<Client, tokio_postgres::Error> {
        connect_with(&client_config(self.listen, APP_USER, APP_DB), None).await
    }

    /// Connects, or panics with the proxy's log.
    pub async fn connect(&self) -> Client {
        match self.try_connect().await {
            Ok(c) => c,
            Err(e) => panic!(
                "connect through proxy failed: {e:?}\n--- proxy log ---\n{}",
                self.proxy.logs()
            ),
        }
    }

    /// The Region a session landed on, told by the server's port.
    pub async fn region_of(&self, client: &Client) -> String {
        let row = client
            .query_one("select current_setting('port')", &[])
            .await
            .expect("query port");
        let port: u16 = row.get::<_, String>(0).parse().expect("port number");
        self.regions
            .iter()
            .find(|r| r.pg.port() == port)
            .map(|r| r.name.clone())
            .unwrap_or_else(|| panic!("no region has port {port}"))
    }

    /// Opens a session, reports its Region and closes it.
    pub async fn landing(&self) -> Result<String, tokio_postgres::Error> {
        let client = self.try_connect().await?;
        Ok(self.region_of(&client).await)
    }

    /// Polls new sessions until one lands on `region`; returns how long
    /// that took, or `None` after `within`.
    pub async fn wait_for_landing(&self, region: &str, within: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        while start.elapsed() < within {
            if let Ok(r) = self.landing().await {
                if r == region {
                    return Some(start.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

/// The proxy config for `regions`, each endpoint dialled through its relay
/// with `db.test.internal` for SNI and verification.
pub fn regions_toml(
    regions: &[Region],
    listen: SocketAddr,
    opts: &RegionsOptions,
    pki: &TestPki,
) -> String {
    let mut s = format!(
        "[listen]\naddress = \"{listen}\"\nstartup_timeout = \"5s\"\n\
         [admin]\naddress = \"{}\"\n\
         [backend]\nkind = \"postgres\"\nauth = \"password\"\npassword = \"{APP_PASSWORD}\"\n\
         tls = \"verify-full\"\nca_file = \"{}\"\nconnect_timeout = \"5s\"\n",
        free_addr(),
        pki.ca_cert_path().display()
    );
    for l in &opts.backend_extra {
        s.push_str(l);
        s.push('\n');
    }
    let probe_user = opts.probe_user.as_deref().unwrap_or(APP_USER);
    s.push_str(&format!(
        "[routing]\nprobe_user = \"{probe_user}\"\nprobe_database = \"{APP_DB}\"\n"
    ));
    for l in &opts.routing {
        s.push_str(l);
        s.push('\n');
    }
    for (i, r) in regions.iter().enumerate() {
        s.push_str(&format!(
            "[[endpoints]]\nname = \"{0}\"\nregion = \"{0}\"\nhost = \"db.test.internal\"\nport = {1}\nconnect_address = \"{2}\"\n",
            r.name,
            r.pg.port(),
            r.relay.addr()
        ));
        if let Some(extra) = opts.endpoint_extra.get(i) {
            for l in extra {
                s.push_str(l);
                s.push('\n');
            }
        }
    }
    s
}
