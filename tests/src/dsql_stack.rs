//! PostgreSQL behind the DSQL emulator behind the proxy with
//! `kind = "dsql"`, `auth = "dsql-iam"`: the whole IAM path, for real.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::emulator::{EmulatorOptions, EmulatorProcess, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use crate::fixture::client_config;
use crate::{free_addr, AuthMethod, PgOptions, PgServer, ProxyProcess, TestPki};

/// How the proxy is set up in front of the emulator.
#[derive(Clone, Debug)]
pub struct DsqlProxyOptions {
    /// `[backend] token_expires_in`.
    pub token_expires_in: String,
    /// Environment for the proxy (all inherited `AWS_*` variables are
    /// removed first). Default: the emulator's test key and region.
    pub env: Vec<(String, String)>,
    /// Extra `[backend]` lines.
    pub backend_extra: Vec<String>,
    /// `[retry]` lines (no table when empty).
    pub retry: Vec<String>,
    /// `[pool]` lines (no table when empty: reuse on, the default).
    pub pool: Vec<String>,
}

impl Default for DsqlProxyOptions {
    fn default() -> Self {
        Self {
            token_expires_in: "15m".into(),
            env: aws_env(ACCESS_KEY_ID, SECRET_ACCESS_KEY),
            backend_extra: Vec::new(),
            retry: Vec::new(),
            pool: Vec::new(),
        }
    }
}

/// An environment with static credentials, no shared config files and no
/// instance metadata, so the SDK's chain finds exactly these.
pub fn aws_env(access_key: &str, secret: &str) -> Vec<(String, String)> {
    let mut env = isolated_aws_env();
    env.push(("AWS_ACCESS_KEY_ID".into(), access_key.into()));
    env.push(("AWS_SECRET_ACCESS_KEY".into(), secret.into()));
    env
}

/// An environment in which the SDK's chain finds no credentials at all
/// (and does not wait for an instance metadata service).
pub fn isolated_aws_env() -> Vec<(String, String)> {
    vec![
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_CONFIG_FILE".into(), "/nonexistent/aws-config".into()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            "/nonexistent/aws-credentials".into(),
        ),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// Server, emulator and proxy, dropped proxy first.
pub struct DsqlStack {
    pub proxy: ProxyProcess,
    pub listen: SocketAddr,
    pub emulator: EmulatorProcess,
    pub pg: PgServer,
    pub pki: Arc<TestPki>,
}

impl DsqlStack {
    pub fn start(opts: DsqlProxyOptions) -> DsqlStack {
        Self::start_with(opts, |_| {})
    }

    /// `tweak` adjusts the emulator's options (limits, credentials, ...).
    pub fn start_with(
        opts: DsqlProxyOptions,
        tweak: impl FnOnce(&mut EmulatorOptions<'_>),
    ) -> DsqlStack {
        let pki = Arc::new(TestPki::new());
        let pg = PgServer::start(PgOptions {
            tls: true,
            allow_plaintext: true,
            auth: AuthMethod::ScramSha256,
            pki: Some(Arc::clone(&pki)),
            ..PgOptions::default()
        });
        let mut emu_opts = EmulatorOptions::new(&pg, &pki);
        tweak(&mut emu_opts);
        let emulator = EmulatorProcess::start(emu_opts);
        let listen = free_addr();
        let proxy = Self::spawn_proxy(&emulator, &pki, listen, &opts);
        DsqlStack {
            proxy,
            listen,
            emulator,
            pg,
            pki,
        }
    }

    /// The proxy config for this stack.
    pub fn proxy_toml(
        emulator: &EmulatorProcess,
        pki: &TestPki,
        listen: SocketAddr,
        opts: &DsqlProxyOptions,
    ) -> String {
        let mut s = format!(
            "[listen]\naddress = \"{listen}\"\nstartup_timeout = \"5s\"\n[admin]\naddress = \"{admin}\"\n\
             [backend]\nkind = \"dsql\"\nauth = \"dsql-iam\"\ntls = \"verify-full\"\nca_file = \"{ca}\"\n\
             connect_timeout = \"5s\"\ntoken_expires_in = \"{life}\"\n",
            admin = free_addr(),
            ca = pki.ca_cert_path().display(),
            life = opts.token_expires_in,
        );
        for l in &opts.backend_extra {
            s.push_str(l);
            s.push('\n');
        }
        // These tests count IAM signings exactly; background probes would
        // sign too. Routing with probes has its own tests.
        s.push_str("[routing]\nprobes = false\n");
        s.push_str(&format!(
            "[[endpoints]]\nname = \"us-east-1\"\nregion = \"{region}\"\nhost = \"{host}\"\nport = 5432\nconnect_address = \"{addr}\"\n",
            region = emulator.region(),
            host = emulator.cluster_host(),
            addr = emulator.addr(),
        ));
        for (table, lines) in [("retry", &opts.retry), ("pool", &opts.pool)] {
            if !lines.is_empty() {
                s.push_str(&format!("[{table}]\n"));
                for l in lines {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    fn spawn_proxy(
        emulator: &EmulatorProcess,
        pki: &TestPki,
        listen: SocketAddr,
        opts: &DsqlProxyOptions,
    ) -> ProxyProcess {
        let toml = Self::proxy_toml(emulator, pki, listen, opts);
        let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &opts.env);
        proxy.wait_ready(listen, crate::proxy::START_TIMEOUT);
        proxy
    }

    /// Plain-TCP client settings for the proxy (no password: the proxy
    /// signs the token).
    pub fn client_config(&self, user: &str, dbname: &str) -> tokio_postgres::Config {
        client_config(self.listen, user, dbname)
    }

    pub async fn try_connect(
        &self,
        user: &str,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        crate::connect_with(&self.client_config(user, dbname), None).await
    }

    /// Connects through the proxy; panics with all three logs on failure.
    pub async fn connect(&self, user: &str, dbname: &str) -> tokio_postgres::Client {
        match self.try_connect(user, dbname).await {
            Ok(c) => c,
            Err(e) => panic!(
                "connect through proxy failed: {e:?}\n--- proxy ---\n{}\n--- emulator ---\n{}",
                self.proxy.logs(),
                self.emulator.logs()
            ),
        }
    }

    /// How many tokens the proxy has signed so far (from its log).
    pub fn signings(&self) -> usize {
        self.proxy.logs().matches("signed a new IAM token").count()
    }
}
