//! The demo's commands (`fail`, `hang`, `heal`, `slow`, `help`, `quit`),
//! from stdin or from the admin API's `POST /demo/<command>/<args>`, and
//! what they do to the simulated Regions' network (their relays).

use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_admin::{AdminError, DemoControl};
use tokio::sync::Notify;

use dsql_proxy_netsim::{Relay, RelayMode};

/// Largest added round trip `slow` accepts (a minute is already absurd).
const MAX_SLOW_MS: u64 = 60_000;

pub const HELP: &str = "commands:
  fail <region>       refuse and reset its connections (the Region is down)
  hang <region>       accept connections but never forward (a network partition)
  heal <region>       back to normal (keeps its latency)
  slow <region> <ms>  set its added round-trip latency
  help                this text
  quit                stop everything and clean up
the same through the admin API: POST /demo/<command>/<region>[/<ms>]";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Fail(String),
    Hang(String),
    Heal(String),
    Slow(String, u64),
    Help,
    Quit,
}

/// Parses one command line (words separated by whitespace). `Ok(None)` for
/// a blank line.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let Some((&verb, args)) = words.split_first() else {
        return Ok(None);
    };
    let region = |args: &[&str]| match args {
        [region] => Ok((*region).to_owned()),
        _ => Err(format!("usage: {verb} <region>")),
    };
    let command = match verb {
        "fail" => Command::Fail(region(args)?),
        "hang" => Command::Hang(region(args)?),
        "heal" => Command::Heal(region(args)?),
        "slow" => match args {
            [region, ms] => {
                let ms: u64 = ms
                    .trim_end_matches("ms")
                    .parse()
                    .map_err(|_| format!("slow: {ms:?} is not a number of milliseconds"))?;
                if ms > MAX_SLOW_MS {
                    return Err(format!("slow: at most {MAX_SLOW_MS} ms"));
                }
                Command::Slow((*region).to_owned(), ms)
            }
            _ => return Err("usage: slow <region> <ms>".into()),
        },
        "help" | "?" if args.is_empty() => Command::Help,
        "quit" | "exit" if args.is_empty() => Command::Quit,
        "help" | "?" | "quit" | "exit" => return Err(format!("{verb} takes no arguments")),
        other => return Err(format!("unknown command {other:?} (try `help`)")),
    };
    Ok(Some(command))
}

/// One simulated Region's network, as commands change it.
pub struct RegionNet {
    pub name: String,
    pub relay: Relay,
}

impl RegionNet {
    /// The added round trip: the relay delays each direction by half.
    pub fn added_rtt(&self) -> Duration {
        let (upstream, downstream) = self.relay.delay();
        upstream + downstream
    }

    pub fn set_added_rtt(&self, rtt: Duration) {
        self.relay.set_delay(rtt / 2, rtt / 2);
    }

    /// The network state in words, for the table.
    pub fn describe(&self) -> String {
        let rtt = self.added_rtt().as_millis();
        match self.relay.mode() {
            RelayMode::Pass => format!("ok +{rtt}ms"),
            RelayMode::Refuse => "FAILED (resets)".into(),
            RelayMode::Hang => "HUNG (blackhole)".into(),
        }
    }
}

/// Every Region, and the `quit` signal; shared by stdin and the admin API.
pub struct DemoRegions {
    pub regions: Vec<RegionNet>,
    pub quit: Notify,
}

impl DemoRegions {
    fn find(&self, name: &str) -> Result<&RegionNet, AdminError> {
        self.regions.iter().find(|r| r.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
            AdminError::DemoUnknown(format!(
                "no Region named {name:?} (Regions: {})",
                names.join(", ")
            ))
        })
    }

    /// Runs a command; the answer in words.
    pub fn apply(&self, command: &Command) -> Result<String, AdminError> {
        Ok(match command {
            Command::Fail(name) => {
                self.find(name)?.relay.set_mode(RelayMode::Refuse);
                format!("{name}: failed: its connections are refused and reset")
            }
            Command::Hang(name) => {
                self.find(name)?.relay.set_mode(RelayMode::Hang);
                format!("{name}: hung: connections are accepted but nothing is forwarded")
            }
            Command::Heal(name) => {
                self.find(name)?.relay.set_mode(RelayMode::Pass);
                format!("{name}: healed")
            }
            Command::Slow(name, ms) => {
                self.find(name)?.set_added_rtt(Duration::from_millis(*ms));
                format!("{name}: added round trip now {ms} ms")
            }
            Command::Help => HELP.to_owned(),
            Command::Quit => {
                self.quit.notify_one();
                "stopping the demo".to_owned()
            }
        })
    }
}

impl DemoControl for DemoRegions {
    fn command(&self, command: &str, args: &[&str]) -> Result<String, AdminError> {
        let line = std::iter::once(command)
            .chain(args.iter().copied())
            .collect::<Vec<_>>()
            .join(" ");
        match parse(&line) {
            Ok(Some(c)) => self.apply(&c),
            Ok(None) => Err(AdminError::DemoUnknown("no command".into())),
            Err(e) if e.starts_with("unknown command") => Err(AdminError::DemoUnknown(e)),
            Err(e) => Err(AdminError::DemoInvalid(e)),
        }
    }
}

/// So the admin state can hold the same regions the stdin loop uses.
pub fn as_control(regions: &Arc<DemoRegions>) -> Arc<dyn DemoControl> {
    Arc::clone(regions) as Arc<dyn DemoControl>
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands() {
        assert_eq!(parse("  "), Ok(None));
        assert_eq!(
            parse("fail us-east-1"),
            Ok(Some(Command::Fail("us-east-1".into())))
        );
        assert_eq!(parse(" hang  b "), Ok(Some(Command::Hang("b".into()))));
        assert_eq!(parse("heal b"), Ok(Some(Command::Heal("b".into()))));
        assert_eq!(
            parse("slow b 120"),
            Ok(Some(Command::Slow("b".into(), 120)))
        );
        assert_eq!(
            parse("slow b 120ms"),
            Ok(Some(Command::Slow("b".into(), 120)))
        );
        assert_eq!(parse("help"), Ok(Some(Command::Help)));
        assert_eq!(parse("quit"), Ok(Some(Command::Quit)));
        assert_eq!(parse("fail"), Err("usage: fail <region>".into()));
        assert_eq!(parse("fail a b"), Err("usage: fail <region>".into()));
        assert!(parse("slow b fast").unwrap_err().contains("not a number"));
        assert!(parse("slow b 999999").unwrap_err().contains("at most"));
        assert!(parse("quit now").unwrap_err().contains("no arguments"));
        assert!(parse("reboot a")
            .unwrap_err()
            .starts_with("unknown command"));
    }
}
