//! A global database made of real PostgreSQL servers: a primary and
//! streaming standbys (pg_basebackup -R), each a "Region", with the real
//! proxy in front under `kind = "aurora-global"`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::{free_addr, PgOptions, PgServer, ProxyProcess, APP_DB, APP_PASSWORD, APP_USER};

/// Region names: the primary's, then each standby's.
pub const REGIONS: [&str; 3] = ["east", "west", "south"];

/// The table writes go to: each row records the server's clock and port.
pub const WRITES_TABLE: &str = "create table writes (\
    id bigserial primary key, \
    at timestamptz not null default clock_timestamp(), \
    port int not null default current_setting('port')::int, \
    note text); \
    alter table writes owner to app";

#[derive(Clone, Debug)]
pub struct GlobalOptions {
    /// Standbys of the primary.
    pub standbys: usize,
    /// List the primary among the proxy's endpoints.
    pub primary_in_proxy: bool,
    /// Extra `[routing]` lines.
    pub routing: Vec<String>,
    /// The proxy's AWS environment (inherited `AWS_*` variables are
    /// removed first).
    pub proxy_env: Vec<(String, String)>,
    /// SQL run as superuser in the app database on the primary before the
    /// standbys are cloned (so they have it too) and the proxy starts.
    pub primary_setup: Vec<String>,
}

impl Default for GlobalOptions {
    fn default() -> Self {
        Self {
            standbys: 1,
            primary_in_proxy: true,
            routing: Vec::new(),
            primary_setup: Vec::new(),
            proxy_env: Vec::new(),
        }
    }
}

pub struct GlobalStack {
    pub proxy: ProxyProcess,
    pub listen: SocketAddr,
    pub read_only: SocketAddr,
    pub admin: SocketAddr,
    /// The primary first, then the standbys; named by [`REGIONS`].
    /// Dropped after the proxy.
    pub servers: Vec<PgServer>,
}

impl GlobalStack {
    pub fn start(opts: GlobalOptions) -> GlobalStack {
        assert!(
            opts.standbys < REGIONS.len(),
            "at most {} standbys",
            REGIONS.len() - 1
        );
        let primary = PgServer::start(PgOptions::default());
        sql_in(&primary, APP_DB, WRITES_TABLE);
        for sql in &opts.primary_setup {
            sql_in(&primary, APP_DB, sql);
        }
        let mut servers = vec![primary];
        for _ in 0..opts.standbys {
            let standby = servers[0].start_standby(PgOptions::default());
            servers.push(standby);
        }
        let (listen, read_only, admin) = (free_addr(), free_addr(), free_addr());
        let first = usize::from(!opts.primary_in_proxy);
        let endpoints: Vec<(&str, &PgServer)> = REGIONS
            .iter()
            .zip(&servers)
            .skip(first)
            .map(|(name, pg)| (*name, pg))
            .collect();
        let toml = global_toml(listen, read_only, admin, &endpoints, &opts.routing);
        let mut proxy = ProxyProcess::spawn_with_env(&toml, &[], &opts.proxy_env);
        proxy.wait_ready(listen, Duration::from_secs(30));
        GlobalStack {
            proxy,
            listen,
            read_only,
            admin,
            servers,
        }
    }

    pub fn primary(&self) -> &PgServer {
        &self.servers[0]
    }

    /// `GET path` on the admin server: the body.
    pub fn admin_get(&self, path: &str) -> String {
        http_get(self.admin, path)
    }

    /// A sample of a metric family with exactly these labels (rendered as
    /// Prometheus does, e.g. `endpoint="east",region="east"`), or `None`.
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let text = self.admin_get("/metrics");
        let key = if labels.is_empty() {
            format!("dsql_proxy_{name} ")
        } else {
            format!("dsql_proxy_{name}{{{labels}}} ")
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until the proxy's writer is `region` (by its metric).
    pub fn wait_for_writer(&self, region: &str, timeout: Duration) -> bool {
        let labels = format!("endpoint=\"{region}\",region=\"{region}\"");
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if self.metric("writer", &labels) == Some(1.0) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

/// The proxy config: password auth as [`APP_USER`] (probes too), plain TCP
/// to the servers, probes every 250ms.
pub fn global_toml(
    listen: SocketAddr,
    read_only: SocketAddr,
    admin: SocketAddr,
    endpoints: &[(&str, &PgServer)],
    routing: &[String],
) -> String {
    let mut s = format!(
        "[listen]\naddress = \"{listen}\"\nread_only_address = \"{read_only}\"\n\
         startup_timeout = \"3s\"\n\
         [admin]\naddress = \"{admin}\"\n\
         [backend]\nkind = \"aurora-global\"\nauth = \"password\"\npassword = \"{APP_PASSWORD}\"\n\
         tls = \"disable\"\nconnect_timeout = \"2s\"\n\
         [routing]\nprobe_user = \"{APP_USER}\"\nprobe_database = \"{APP_DB}\"\n\
         probe_interval = \"250ms\"\nprobe_timeout = \"1s\"\n"
    );
    for line in routing {
        s.push_str(line);
        s.push('\n');
    }
    for (name, pg) in endpoints {
        s.push_str(&format!(
            "[[endpoints]]\nname = \"{name}\"\nregion = \"{name}\"\nhost = \"localhost\"\n\
             port = {}\nconnect_address = \"{}\"\n",
            pg.port(),
            pg.addr()
        ));
    }
    s
}

/// Runs `sql` as the bootstrap superuser in `db`; unaligned tuples.
pub fn sql_in(pg: &PgServer, db: &str, sql: &str) -> String {
    let out = pg
        .psql_command()
        .env("PGDATABASE", db)
        .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        pg.log_contents()
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

/// One HTTP/1.1 GET with `Connection: close`; the body ("" on failure).
pub fn http_get(addr: SocketAddr, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Aurora's global database functions, with the columns Aurora documents,
/// over a table a test controls (`aurora_fake`): the primary is instance
/// `east-1` in `us-east-1` holding `MASTER_SESSION_ID`, a standby is
/// `west-1` in `us-west-2`. Plain PostgreSQL has no such functions; with
/// these the proxy takes it for Aurora and reads Regions and lag from them.
/// The table replicates, so a test changes a standby's reported lag with an
/// `UPDATE` on the primary.
pub const FAKE_AURORA_FUNCTIONS: &str = "\
    create table aurora_fake (server_id text primary key, session_id text, aws_region text, \
      visibility_lag_in_msec bigint, rpo_lag_in_msec bigint); \
    insert into aurora_fake values ('east-1', 'MASTER_SESSION_ID', 'us-east-1', 0, -1), \
      ('west-1', 'a1b2c3', 'us-west-2', 0, 0); \
    grant select on aurora_fake to app; \
    create function aurora_db_instance_identifier() returns text language sql stable as \
      $$ select case when pg_is_in_recovery() then 'west-1' else 'east-1' end $$; \
    create function aurora_global_db_instance_status() returns table (server_id text, \
      session_id text, aws_region text, durable_lsn numeric, highest_lsn_rcvd numeric, \
      feedback_epoch int, feedback_xmin int, oldest_read_view_lsn numeric, \
      visibility_lag_in_msec bigint) language sql stable as \
      $$ select server_id, session_id, aws_region, null::numeric, null::numeric, null::int, \
         null::int, null::numeric, visibility_lag_in_msec from aurora_fake $$; \
    create function aurora_global_db_status() returns table (aws_region text, \
      highest_lsn_written numeric, durability_lag_in_msec numeric, rpo_lag_in_msec numeric, \
      last_lag_calculation_time timestamptz, feedback_epoch int, feedback_xmin int) \
      language sql stable as \
      $$ select aws_region, null::numeric, null::numeric, rpo_lag_in_msec::numeric, \
         null::timestamptz, null::int, null::int from aurora_fake $$";
