//! The demo's live table of Regions: what each Region's network does (the
//! demo's doing), what the proxy thinks of it (health, latency, selection)
//! and its open sessions. Pure rendering; `mod.rs` decides when to draw.

use std::fmt::Write as _;

use dsql_proxy_admin::AdminState;

use super::control::DemoRegions;

/// One Region's row.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionRow {
    pub name: String,
    /// The simulated network, e.g. `ok +40ms` or `FAILED (resets)`.
    pub network: String,
    /// The proxy's view: `up`, `down`, `unknown`.
    pub health: String,
    pub latency_ms: Option<f64>,
    pub selected: bool,
    pub drained: bool,
    pub sessions: i64,
}

/// Reads the rows from the proxy's routing table and the Regions' relays.
pub fn rows(admin: &AdminState, regions: &DemoRegions) -> Vec<RegionRow> {
    let table = admin.router.snapshot();
    let selected = table.selected().map(|e| e.id);
    regions
        .regions
        .iter()
        .map(|region| {
            let endpoint = table.endpoints().iter().find(|e| e.name == region.name);
            let status = endpoint.and_then(|e| table.status(e.id));
            RegionRow {
                name: region.name.clone(),
                network: region.describe(),
                health: status.map_or("-".into(), |s| s.liveness.as_str().to_owned()),
                latency_ms: status
                    .and_then(|s| s.latency)
                    .map(|d| d.as_secs_f64() * 1e3),
                selected: endpoint.is_some_and(|e| Some(e.id) == selected),
                drained: endpoint.is_some_and(|e| admin.router.manual().is_drained(e.id)),
                sessions: endpoint
                    .and_then(|e| {
                        admin
                            .metrics
                            .sessions_active
                            .get_metric_with_label_values(&[&e.name, e.region_label()])
                            .ok()
                    })
                    .map_or(0, |g| g.get()),
            }
        })
        .collect()
}

/// The table, one line per Region, columns aligned.
pub fn render_table(rows: &[RegionRow]) -> String {
    let header = [
        "REGION", "NETWORK", "HEALTH", "LATENCY", "SELECTED", "SESSIONS",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for r in rows {
        cells.push(vec![
            r.name.clone(),
            r.network.clone(),
            if r.drained {
                format!("{} (drained)", r.health)
            } else {
                r.health.clone()
            },
            r.latency_ms.map_or("-".into(), |ms| format!("{ms:.1}ms")),
            if r.selected { "*" } else { "" }.to_owned(),
            r.sessions.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What counts as a change worth a line when stdout is not a terminal:
/// everything but the latencies, which move with every probe.
pub fn change_key(rows: &[RegionRow]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "{}:{}:{}:{}:{}",
                r.name, r.network, r.health, r.selected, r.drained
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line for the log-style (non-terminal) output.
pub fn summary_line(rows: &[RegionRow]) -> String {
    let selected = rows
        .iter()
        .find(|r| r.selected)
        .map_or("none", |r| r.name.as_str());
    let regions: Vec<String> = rows
        .iter()
        .map(|r| {
            let latency = r.latency_ms.map_or("-".into(), |ms| format!("{ms:.0}ms"));
            let drained = if r.drained { " drained" } else { "" };
            format!("{} {}{drained} {latency} [{}]", r.name, r.health, r.network)
        })
        .collect();
    format!("selected {selected} | {}", regions.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, health: &str, latency: Option<f64>, selected: bool) -> RegionRow {
        RegionRow {
            name: name.into(),
            network: "ok +5ms".into(),
            health: health.into(),
            latency_ms: latency,
            selected,
            drained: false,
            sessions: 0,
        }
    }

    #[test]
    fn renders_an_aligned_table() {
        let mut rows = vec![
            row("us-east-1", "up", Some(6.04), true),
            row("us-west-2", "down", None, false),
        ];
        rows[1].network = "FAILED (resets)".into();
        rows[1].drained = true;
        rows[0].sessions = 2;
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "REGION     NETWORK          HEALTH          LATENCY  SELECTED  SESSIONS",
                "us-east-1  ok +5ms          up              6.0ms    *         2",
                "us-west-2  FAILED (resets)  down (drained)  -                  0",
            ]
        );
    }

    #[test]
    fn latency_alone_is_no_change_but_health_is() {
        let a = vec![
            row("a", "up", Some(5.0), true),
            row("b", "up", Some(40.0), false),
        ];
        let mut b = a.clone();
        b[0].latency_ms = Some(7.0);
        assert_eq!(change_key(&a), change_key(&b));
        b[0].health = "down".into();
        assert_ne!(change_key(&a), change_key(&b));
        assert_eq!(
            summary_line(&a),
            "selected a | a up 5ms [ok +5ms], b up 40ms [ok +5ms]"
        );
    }
}
