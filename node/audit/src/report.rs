//! What auditors read: a per-analyst, per-dataset summary of an audit log,
//! and a self-contained HTML report (inline SVG chart, no external assets).
//!
//! Both work from verified or unverified entries alike; verify an export
//! first with [`crate::verify`] when it came from elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use fedq_dp::accounting::Measure;

use crate::{Entry, Event};

/// One line of the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SummaryRow {
    /// Analyst identity.
    pub analyst: String,
    /// Dataset.
    pub dataset: String,
    /// Queries released.
    pub answered: u64,
    /// Queries refused.
    pub refused: u64,
    /// Debited, in the dataset's measure (epsilon, or rho for zCDP).
    pub spent: f64,
    /// Granted on top of the configured limit, in the dataset's measure.
    pub granted: f64,
    /// The dataset's measure, `pure` or `zcdp`.
    pub measure: String,
    /// Left for this analyst under the latest logged limits, if known.
    pub remaining: Option<f64>,
    /// For a zCDP dataset: the (epsilon, delta)-DP equivalent of `spent`
    /// at the dataset's logged delta, computed here (OpenDP's conversion,
    /// as the node's Budget RPC states it; debit entries leave it out).
    pub spent_equivalent: Option<(f64, f64)>,
}

impl SummaryRow {
    /// The unit of `spent`: `epsilon`, or `rho` with its (epsilon, delta)
    /// equivalent when the dataset's delta is logged.
    pub fn unit(&self) -> String {
        match (self.measure.as_str(), self.spent_equivalent) {
            ("zcdp", Some((e, d))) => format!("rho (epsilon {e:.4} at delta {d:e})"),
            ("zcdp", None) => "rho".into(),
            _ => "epsilon".into(),
        }
    }
}

/// Summarises entries per analyst and dataset, sorted.
pub fn summarize(entries: &[Entry]) -> Vec<SummaryRow> {
    let mut rows: BTreeMap<(String, String), SummaryRow> = BTreeMap::new();
    let mut dataset_of: HashMap<(String, String), String> = HashMap::new();
    let mut limits: HashMap<String, (f64, f64)> = HashMap::new();
    let mut measure_of: HashMap<String, String> = HashMap::new();
    let mut delta_of: HashMap<String, f64> = HashMap::new();
    let mut dataset_spent: HashMap<String, f64> = HashMap::new();
    let row = |a: &str, d: &str| -> (String, String) { (a.to_string(), d.to_string()) };
    for e in entries {
        // An event this version cannot read (a newer node's) counts for
        // nothing here; it still verifies.
        let Ok(event) = e.event() else { continue };
        match &event {
            Event::NodeStarted { limits: l, .. } => {
                for x in l {
                    limits.insert(x.dataset.clone(), (x.per_analyst.value(), x.total.value()));
                    measure_of.insert(x.dataset.clone(), x.measure.clone());
                    if let Some(d) = &x.delta {
                        delta_of.insert(x.dataset.clone(), d.value());
                    }
                }
            }
            Event::LimitsChanged { after, .. } => {
                limits.insert(
                    after.dataset.clone(),
                    (after.per_analyst.value(), after.total.value()),
                );
                measure_of.insert(after.dataset.clone(), after.measure.clone());
                if let Some(d) = &after.delta {
                    delta_of.insert(after.dataset.clone(), d.value());
                }
            }
            Event::QueryReceived {
                analyst,
                query_id,
                dataset,
                ..
            } => {
                dataset_of.insert((analyst.clone(), query_id.clone()), dataset.clone());
            }
            // Refusals of other calls (an audit export, say) carry no query id.
            Event::Refused { query_id, .. } if query_id.is_empty() => {}
            Event::Refused {
                analyst, query_id, ..
            } => {
                let d = dataset_of
                    .get(&(analyst.clone(), query_id.clone()))
                    .cloned()
                    .unwrap_or_default();
                rows.entry(row(analyst, &d)).or_default().refused += 1;
            }
            // Summaries: an analyst's refused queries (an attempted
            // export is not a query).
            Event::Refusals {
                identity,
                role,
                dataset,
                reason,
                count,
                ..
            } => {
                if role == "analyst" && reason != "not_an_auditor" {
                    rows.entry(row(identity, dataset)).or_default().refused += count;
                }
            }
            // A ledger accounts in one measure, so one of epsilon and rho
            // is 0 and their sum is the amount in that measure.
            Event::Debited {
                analyst,
                dataset,
                epsilon,
                rho,
                ..
            }
            | Event::Reserved {
                analyst,
                dataset,
                epsilon,
                rho,
                ..
            } => {
                let amount = epsilon.value() + rho.value();
                rows.entry(row(analyst, dataset)).or_default().spent += amount;
                *dataset_spent.entry(dataset.clone()).or_default() += amount;
            }
            Event::ReservationReturned {
                analyst,
                dataset,
                epsilon,
                rho,
                ..
            } => {
                let amount = epsilon.value() + rho.value();
                rows.entry(row(analyst, dataset)).or_default().spent -= amount;
                *dataset_spent.entry(dataset.clone()).or_default() -= amount;
            }
            Event::Released {
                analyst, dataset, ..
            } => {
                rows.entry(row(analyst, dataset)).or_default().answered += 1;
            }
            Event::BudgetGranted {
                analyst,
                dataset,
                epsilon,
                ..
            } => {
                rows.entry(row(analyst, dataset)).or_default().granted += epsilon.value();
            }
            Event::Ingested { .. } | Event::Migrated { .. } | Event::Replayed { .. } => {}
        }
    }
    rows.into_iter()
        .map(|((analyst, dataset), mut r)| {
            r.remaining = limits.get(&dataset).map(|&(per_analyst, total)| {
                let own = per_analyst + r.granted - r.spent;
                let all = total - dataset_spent.get(&dataset).copied().unwrap_or(0.0);
                own.min(all).max(0.0)
            });
            r.measure = match measure_of.get(&dataset).map(String::as_str) {
                Some("zcdp") => "zcdp".into(),
                _ => "pure".into(),
            };
            r.spent_equivalent = (r.measure == "zcdp")
                .then(|| delta_of.get(&dataset))
                .flatten()
                .and_then(|&delta| Measure::Zcdp.equivalent(r.spent, delta).ok());
            r.analyst = analyst;
            r.dataset = dataset;
            r
        })
        .collect()
}

/// The summary as a plain-text table.
pub fn summary_table(rows: &[SummaryRow]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:>8} {:>8} {:>10} {:>9} {:>10}  {}\n",
        "analyst", "dataset", "answered", "refused", "spent", "granted", "remaining", "unit"
    );
    for r in rows {
        let unit = r.unit();
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>8} {:>8} {:>10.4} {:>9.4} {:>10}  {unit}",
            r.analyst,
            if r.dataset.is_empty() {
                "?"
            } else {
                &r.dataset
            },
            r.answered,
            r.refused,
            r.spent,
            r.granted,
            r.remaining
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "?".into())
        );
    }
    out
}

/// `YYYY-MM-DD HH:MM:SS` UTC for milliseconds since the epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const PALETTE: [&str; 8] = [
    "#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#00798c", "#8c564b", "#555555",
];

/// Cumulative epsilon (or rho, for zCDP datasets, in series of their own)
/// over time for each series key.
fn series(
    entries: &[Entry],
    key: impl Fn(&str, &str) -> String,
) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut out: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for e in entries {
        if let Ok(Event::Debited {
            analyst,
            dataset,
            epsilon,
            rho,
            ..
        }) = e.event()
        {
            let (epsilon, rho) = (epsilon.value(), rho.value());
            // Rho (zCDP datasets) and epsilon never share a series.
            let name = if rho > 0.0 {
                format!("{} (rho)", key(&analyst, &dataset))
            } else {
                key(&analyst, &dataset)
            };
            let s = out.entry(name).or_default();
            let before = s.last().map_or(0.0, |p| p.1);
            s.push((e.time_ms, before + epsilon + rho));
        }
    }
    out
}

fn chart(title: &str, data: &BTreeMap<String, Vec<(u64, f64)>>, t0: u64, t1: u64) -> String {
    let (w, h, pad) = (760.0, 260.0, 48.0);
    let ymax = data
        .values()
        .flat_map(|s| s.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let span = (t1.saturating_sub(t0)).max(1) as f64;
    let x = |t: u64| pad + (t.saturating_sub(t0)) as f64 / span * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v / ymax * (h - 2.0 * pad);
    let mut svg = format!(
        "<h2>{}</h2><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{}\">\
<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\
<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/><line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"#999\"/>\
<text x=\"4\" y=\"{}\" font-size=\"11\">{ymax:.3}</text><text x=\"4\" y=\"{}\" font-size=\"11\">0</text>\
<text x=\"{pad}\" y=\"{}\" font-size=\"11\">{}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{}</text>",
        escape(title),
        escape(title),
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        pad + 4.0,
        h - pad,
        h - pad + 16.0,
        utc(t0),
        w - pad,
        h - pad + 16.0,
        utc(t1)
    );
    for (i, (name, points)) in data.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut path = format!("M{:.1},{:.1}", x(points[0].0), y(0.0));
        let mut last = 0.0;
        for &(t, v) in points {
            let _ = write!(
                path,
                " L{:.1},{:.1} L{:.1},{:.1}",
                x(t),
                y(last),
                x(t),
                y(v)
            );
            last = v;
        }
        let _ = write!(path, " L{:.1},{:.1}", x(t1), y(last));
        let _ = write!(
            svg,
            "<path d=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>\
<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{color}\">{} ({last:.3})</text>",
            w - pad + 4.0 - 200.0,
            pad + 14.0 * (i as f64 + 1.0),
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One self-contained HTML page: summary, charts of epsilon spent over time
/// per analyst and per dataset, and the table of events.
pub fn html(node: &str, entries: &[Entry], verified: &str) -> String {
    let t0 = entries.first().map_or(0, |e| e.time_ms);
    let t1 = entries.last().map_or(1, |e| e.time_ms).max(t0 + 1);
    let mut page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedq audit report: {n}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;font-size:13px}}\
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}th{{background:#f3f3f3}}\
code{{font-size:12px;word-break:break-all}}</style></head><body>\
<h1>Audit report: {n}</h1><p>{} entries, {} to {} (UTC). {}</p>",
        entries.len(),
        utc(t0),
        utc(t1),
        escape(verified),
        n = escape(node)
    );
    page.push_str("<h2>Budget per analyst and dataset</h2><table><tr><th>analyst</th><th>dataset</th><th>answered</th><th>refused</th><th>spent</th><th>granted</th><th>remaining</th></tr>");
    for r in summarize(entries) {
        let unit = escape(&r.unit());
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.4} {unit}</td><td>{:.4}</td><td>{}</td></tr>",
            escape(&r.analyst),
            escape(&r.dataset),
            r.answered,
            r.refused,
            r.spent,
            r.granted,
            r.remaining.map(|v| format!("{v:.4}")).unwrap_or_else(|| "?".into())
        );
    }
    page.push_str("</table>");
    let per_analyst = series(entries, |a, _| a.to_string());
    let per_dataset = series(entries, |_, d| d.to_string());
    if per_analyst.is_empty() {
        page.push_str("<p>No budget was spent in this log.</p>");
    } else {
        page.push_str(&chart(
            "Epsilon spent over time, per analyst",
            &per_analyst,
            t0,
            t1,
        ));
        page.push_str(&chart(
            "Epsilon spent over time, per dataset",
            &per_dataset,
            t0,
            t1,
        ));
    }
    page.push_str("<h2>Events</h2><table><tr><th>seq</th><th>time (UTC)</th><th>event</th><th>details</th><th>hash</th></tr>");
    for e in entries {
        let details = serde_json::from_str::<serde_json::Value>(e.event.get())
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    o.remove("type");
                }
                v.to_string()
            })
            .unwrap_or_default();
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}…</code></td></tr>",
            e.seq,
            utc(e.time_ms),
            e.event().map_or("unknown", |ev| ev.kind()),
            escape(&details),
            &e.hash[..12.min(e.hash.len())]
        );
    }
    page.push_str("</table></body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(x: f64) -> crate::Decimal {
        crate::Decimal::from_f64(x).unwrap()
    }

    fn entry(seq: u64, time_ms: u64, event: Event) -> Entry {
        Entry {
            v: crate::FORMAT_VERSION,
            seq,
            time_ms,
            prev: String::new(),
            event: serde_json::value::RawValue::from_string(serde_json::to_string(&event).unwrap())
                .unwrap(),
            hash: "ab".repeat(32),
            sig: String::new(),
        }
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_000_000_000), "2026-11-18 11:06:40");
    }

    #[test]
    fn summary_counts_and_remaining() {
        let entries = vec![
            entry(
                0,
                1000,
                Event::NodeStarted {
                    version: "0".into(),
                    config_sha256: String::new(),
                    audit_public_key: String::new(),
                    limits: vec![crate::DatasetLimits {
                        dataset: "cases".into(),
                        per_analyst: d(1.0),
                        total: d(5.0),
                        per_query_max: d(1.0),
                        measure: String::new(),
                        delta: None,
                    }],
                },
            ),
            entry(
                1,
                2000,
                Event::QueryReceived {
                    analyst: "a".into(),
                    query_id: "q1".into(),
                    dataset: "cases".into(),
                    sql: String::new(),
                    epsilon: d(0.4),
                    dry_run: false,
                    rho: d(0.0),
                },
            ),
            entry(
                2,
                2001,
                Event::Debited {
                    keys_delta: d(0.0),
                    analyst_keys_delta_spent: d(0.0),
                    analyst: "a".into(),
                    query_id: "q1".into(),
                    dataset: "cases".into(),
                    epsilon: d(0.4),
                    analyst_spent: d(0.4),
                    dataset_spent: d(0.4),
                    measure: String::new(),
                    rho: d(0.0),
                    analyst_spent_equivalent: None,
                },
            ),
            entry(
                3,
                2002,
                Event::Released {
                    analyst: "a".into(),
                    query_id: "q1".into(),
                    dataset: "cases".into(),
                    measurements: vec![],
                    response_sha256: String::new(),
                    source: None,
                    secure: None,
                },
            ),
            entry(
                4,
                3000,
                Event::QueryReceived {
                    analyst: "a".into(),
                    query_id: "q2".into(),
                    dataset: "cases".into(),
                    sql: String::new(),
                    epsilon: d(0.9),
                    dry_run: false,
                    rho: d(0.0),
                },
            ),
            entry(
                5,
                3001,
                Event::Refused {
                    analyst: "a".into(),
                    query_id: "q2".into(),
                    reason: "over budget".into(),
                },
            ),
            entry(
                6,
                4000,
                Event::BudgetGranted {
                    analyst: "a".into(),
                    dataset: "cases".into(),
                    epsilon: d(0.5),
                    granted_total: d(0.5),
                    measure: String::new(),
                },
            ),
            // A migration of the rows spends and grants nothing, and
            // leaves the budget as it was.
            entry(
                7,
                5000,
                Event::Migrated {
                    dataset: "cases".into(),
                    from_schema: "a".repeat(64),
                    to_schema: "b".repeat(64),
                    from_standard: None,
                    to_standard: None,
                },
            ),
        ];
        let rows = summarize(&entries);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.answered, r.refused), (1, 1));
        assert!((r.spent - 0.4).abs() < 1e-12 && (r.granted - 0.5).abs() < 1e-12);
        assert!((r.remaining.unwrap() - 1.1).abs() < 1e-12);
        let page = html("n<1>", &entries, "verified");
        assert!(page.contains("<svg") && page.contains("n&lt;1&gt;"));
        assert!(
            page.contains("<td>migrated</td>"),
            "listed among the events"
        );
        assert!(
            !page.contains("<script") && !page.contains("src="),
            "self-contained"
        );
    }

    /// A zCDP dataset's totals are shown in rho with their (epsilon, delta)
    /// equivalent at the logged delta, computed from the entries (which
    /// no longer state it per debit) as the node's Budget RPC states it.
    #[test]
    fn zcdp_totals_are_shown_with_their_equivalent() {
        let debit = |seq, id: &str, rho: f64, total: f64| {
            entry(
                seq,
                2000 + seq,
                Event::Debited {
                    keys_delta: d(0.0),
                    analyst_keys_delta_spent: d(0.0),
                    analyst: "a".into(),
                    query_id: id.into(),
                    dataset: "cases_z".into(),
                    epsilon: d(0.0),
                    analyst_spent: d(total),
                    dataset_spent: d(total),
                    measure: "zcdp".into(),
                    rho: d(rho),
                    analyst_spent_equivalent: None,
                },
            )
        };
        let entries = vec![
            entry(
                0,
                1000,
                Event::NodeStarted {
                    version: "0".into(),
                    config_sha256: String::new(),
                    audit_public_key: String::new(),
                    limits: vec![crate::DatasetLimits {
                        dataset: "cases_z".into(),
                        per_analyst: d(1.0),
                        total: d(5.0),
                        per_query_max: d(0.5),
                        measure: "zcdp".into(),
                        delta: Some(d(1e-7)),
                    }],
                },
            ),
            debit(1, "q1", 0.02, 0.02),
            debit(2, "q2", 0.03, 0.05),
        ];
        let rows = summarize(&entries);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert!((r.spent - 0.05).abs() < 1e-12, "{r:?}");
        let want = fedq_dp::accounting::zcdp_to_approx_opendp(r.spent, 1e-7).unwrap();
        assert_eq!(r.spent_equivalent, Some((want, 1e-7)));
        let unit = r.unit();
        assert!(
            unit.starts_with("rho (epsilon ") && unit.contains(&format!("{want:.4}")),
            "{unit}"
        );
        assert!(summary_table(&rows).contains(&unit));
        assert!(html("n", &entries, "verified").contains(&escape(&unit)));
    }
}
