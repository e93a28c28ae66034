//! Streaming replication on [`PgServer`]s: a primary and its standbys
//! (see [`PgServer::start_standby`]) as the Regions of a global database.
//! Promotion, replay pause/resume and catch-up waits, all through the
//! servers' own SQL functions as the bootstrap superuser.

use std::time::{Duration, Instant};

use crate::PgServer;

/// Replication controls for a [`PgServer`].
pub trait Replication {
    /// `true` while the server is a standby (`pg_is_in_recovery()`).
    fn in_recovery(&self) -> bool;
    /// Promotes a standby (`pg_promote()`, which waits for the promotion).
    /// Any old primary keeps running.
    fn promote(&self);
    /// Stops applying WAL; the standby keeps receiving it, so its lag grows
    /// as soon as the primary writes.
    fn pause_replay(&self);
    fn resume_replay(&self);
    /// The server's current WAL insert position (a primary): with
    /// `synchronous_commit = off` (the harness's setting) a commit may not
    /// be written yet, so the write position (`pg_current_wal_lsn()`) can
    /// still be before it.
    fn current_lsn(&self) -> String;
    /// Waits until this standby has replayed `lsn`; panics after `timeout`.
    fn wait_replayed(&self, lsn: &str, timeout: Duration);
    /// The current timeline ID, read from the WAL file name on a writer
    /// and from `pg_control_checkpoint()` on a standby.
    fn timeline(&self) -> u32;
}

impl Replication for PgServer {
    fn in_recovery(&self) -> bool {
        self.superuser_sql("select pg_is_in_recovery()") == "t"
    }

    fn promote(&self) {
        let done = self.superuser_sql("select pg_promote(true, 60)");
        assert_eq!(
            done,
            "t",
            "pg_promote did not finish\n{}",
            self.log_contents()
        );
    }

    fn pause_replay(&self) {
        self.superuser_sql("select pg_wal_replay_pause()");
    }

    fn resume_replay(&self) {
        self.superuser_sql("select pg_wal_replay_resume()");
    }

    fn current_lsn(&self) -> String {
        self.superuser_sql("select pg_current_wal_insert_lsn()")
    }

    fn wait_replayed(&self, lsn: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        while self.superuser_sql(&sql) != "t" {
            assert!(
                Instant::now() < deadline,
                "standby on port {} did not replay {lsn} within {timeout:?}\n{}",
                self.port(),
                self.log_contents()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn timeline(&self) -> u32 {
        let sql = "select case when pg_is_in_recovery() \
                   then (select timeline_id from pg_control_checkpoint()) \
                   else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int end";
        self.superuser_sql(sql)
            .parse()
            .expect("timeline is a number")
    }
}
