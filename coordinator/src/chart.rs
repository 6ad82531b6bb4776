//! Answers you can see: a combined result drawn as horizontal bars with
//! their 95% intervals as whiskers, in the terminal ([`plot`], `fedq query
//! --plot`) and as a self-contained HTML page with the table and an inline
//! SVG chart per aggregate ([`html`], `fedq query --save result.html`).
//!
//! Each aggregate gets its own chart and scale, from 0 to the largest
//! upper interval end of its rows (so every whisker fits); a bar's length
//! is its value over that maximum. Noisy values and interval ends below 0
//! draw from 0 (a noisy count can be negative; its row and interval are
//! still printed). Only released, combined values reach this module.

use std::fmt::Write as _;

use crate::combine::{Combined, Estimate};

/// Width of the terminal bars, in characters.
pub const PLOT_WIDTH: usize = 40;

/// A bar's full cell (outside its interval).
const BAR: char = '█';
/// A bar's cell inside its interval.
const BAR_IN_CI: char = '▒';
/// The interval beyond the bar.
const WHISKER: char = '─';

/// One aggregate's rows: labels and estimates.
struct Series<'a> {
    title: &'a str,
    rows: Vec<(String, Option<Estimate>)>,
    max: f64,
}

/// The charts of `c`: one series per aggregate, one entry per row.
fn series(c: &Combined) -> Vec<Series<'_>> {
    c.outputs
        .iter()
        .enumerate()
        .map(|(i, title)| {
            let rows: Vec<(String, Option<Estimate>)> = c
                .rows
                .iter()
                .map(|r| {
                    let label = if r.key.is_empty() {
                        "(all)".to_string()
                    } else {
                        r.key.join(" · ")
                    };
                    (label, r.estimates.get(i).copied().flatten())
                })
                .collect();
            let max = rows
                .iter()
                .filter_map(|(_, e)| *e)
                .map(|e| e.ci_high.max(e.value))
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max);
            Series { title, rows, max }
        })
        .collect()
}

/// The cell (0..=width) where `v` falls on a 0..max scale.
fn cell(v: f64, max: f64, width: usize) -> usize {
    if !(v.is_finite() && v > 0.0 && max > 0.0) {
        return 0;
    }
    ((v / max).min(1.0) * width as f64).round() as usize
}

/// One row's bar and whisker, `width` characters: the bar is
/// `round(value / max * width)` cells, the interval covers the cells from
/// `ci_low`'s to `ci_high`'s (shaded inside the bar, a line beyond it, `┤`
/// at its end).
pub fn bar_line(e: &Estimate, max: f64, width: usize) -> String {
    let bar = cell(e.value, max, width);
    let (lo, hi) = (
        cell(e.ci_low, max, width).min(width.saturating_sub(1)),
        cell(e.ci_high, max, width).min(width.saturating_sub(1)),
    );
    (0..width)
        .map(|i| {
            let in_ci = lo <= i && i <= hi && e.ci_high > 0.0;
            match (i < bar, in_ci) {
                (true, true) => BAR_IN_CI,
                (true, false) => BAR,
                (false, true) if i == hi => '┤',
                (false, true) => WHISKER,
                (false, false) => ' ',
            }
        })
        .collect::<String>()
        .trim_end()
        .to_string()
}

fn number(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if (v - v.round()).abs() < 1e-9 && v.abs() < 1e15 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.3}")
    }
}

/// The terminal chart of a result: for each aggregate, one line per row
/// with its label, its bar and whisker ([`bar_line`]), its value and its
/// interval. A dry run or a result without rows has nothing to draw and
/// says so.
pub fn plot(c: &Combined) -> String {
    if c.dry_run {
        return "(a dry run has no values to plot)\n".into();
    }
    if c.rows.is_empty() {
        return "(no rows to plot)\n".into();
    }
    let mut out = String::new();
    for s in series(c) {
        let label_width = s
            .rows
            .iter()
            .map(|(l, _)| l.chars().count())
            .max()
            .unwrap_or(0)
            .min(32);
        let _ = writeln!(
            out,
            "{}  (bars from 0 to {}; {BAR_IN_CI}{WHISKER}┤ the 95% interval)",
            s.title,
            number(s.max)
        );
        for (label, e) in &s.rows {
            let shown: String = label.chars().take(label_width).collect();
            match e {
                Some(e) => {
                    let _ = writeln!(
                        out,
                        "  {shown:<label_width$} │{:<PLOT_WIDTH$}│ {} [{}, {}]",
                        bar_line(e, s.max, PLOT_WIDTH),
                        number(e.value),
                        number(e.ci_low),
                        number(e.ci_high)
                    );
                }
                None => {
                    let _ = writeln!(out, "  {shown:<label_width$} │{:PLOT_WIDTH$}│ n/a", "");
                }
            }
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Width of an SVG chart's plotting area, in pixels.
pub const SVG_BAR_WIDTH: f64 = 480.0;

/// One aggregate's SVG: per row a `rect` of class `bar` (width
/// `value / max * SVG_BAR_WIDTH`, with `data-value`, `data-ci-low` and
/// `data-ci-high`), a `line` of class `ci` from the interval's low end to
/// its high end with end ticks, and the label and value as text.
fn svg(s: &Series<'_>) -> String {
    let (label_w, row_h, top) = (220.0, 24.0, 8.0);
    let width = label_w + SVG_BAR_WIDTH + 170.0;
    let height = top * 2.0 + row_h * s.rows.len() as f64;
    let x = |v: f64| {
        label_w
            + if s.max > 0.0 && v.is_finite() {
                (v.max(0.0) / s.max).min(1.0) * SVG_BAR_WIDTH
            } else {
                0.0
            }
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"{t}\">\
<rect class=\"frame\" width=\"100%\" height=\"100%\" fill=\"#fff\"/>\
<line x1=\"{label_w}\" y1=\"{top}\" x2=\"{label_w}\" y2=\"{}\" stroke=\"#999\"/>",
        height - top,
        t = escape(s.title)
    );
    for (i, (label, e)) in s.rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let mid = y + row_h / 2.0;
        let _ = write!(
            out,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text>",
            label_w - 6.0,
            mid + 4.0,
            escape(label)
        );
        let Some(e) = e else {
            let _ = write!(
                out,
                "<text x=\"{}\" y=\"{}\" font-size=\"12\">n/a</text>",
                label_w + 4.0,
                mid + 4.0
            );
            continue;
        };
        let (x0, xv, xl, xh) = (x(0.0), x(e.value), x(e.ci_low), x(e.ci_high));
        let _ = write!(
            out,
            "<rect class=\"bar\" x=\"{x0:.2}\" y=\"{:.2}\" width=\"{:.3}\" height=\"{:.2}\" fill=\"#1b6ca8\" \
data-value=\"{}\" data-ci-low=\"{}\" data-ci-high=\"{}\"><title>{}: {} [{}, {}]</title></rect>\
<line class=\"ci\" x1=\"{xl:.3}\" y1=\"{mid:.2}\" x2=\"{xh:.3}\" y2=\"{mid:.2}\" stroke=\"#222\" stroke-width=\"1.5\"/>\
<line x1=\"{xl:.3}\" y1=\"{:.2}\" x2=\"{xl:.3}\" y2=\"{:.2}\" stroke=\"#222\"/>\
<line x1=\"{xh:.3}\" y1=\"{:.2}\" x2=\"{xh:.3}\" y2=\"{:.2}\" stroke=\"#222\"/>\
<text x=\"{}\" y=\"{}\" font-size=\"12\">{} [{}, {}]</text>",
            y + 4.0,
            xv - x0,
            row_h - 8.0,
            e.value,
            e.ci_low,
            e.ci_high,
            escape(label),
            number(e.value),
            number(e.ci_low),
            number(e.ci_high),
            mid - 5.0,
            mid + 5.0,
            mid - 5.0,
            mid + 5.0,
            label_w + SVG_BAR_WIDTH + 8.0,
            mid + 4.0,
            number(e.value),
            number(e.ci_low),
            number(e.ci_high)
        );
    }
    out.push_str("</svg>");
    out
}

/// A self-contained HTML page of one or more results (no external
/// assets), in the audit report's style: per result, the query, the table
/// of values and 95% intervals, one SVG bar chart per aggregate ([`svg`])
/// and what each node answered and spent.
pub fn html(results: &[&Combined]) -> String {
    let title = match results {
        [one] => escape(&one.sql),
        _ => format!("{} queries", results.len()),
    };
    let mut page = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fedq result: {title}</title>\
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;font-size:13px}}\
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}th{{background:#f3f3f3}}\
td.n{{text-align:right}}code{{font-size:13px}}</style></head><body><h1>fedq result</h1>"
    );
    for c in results {
        page.push_str(&section(c));
    }
    page.push_str(
        "<p>Values are sums of the nodes' differentially private noisy answers; each interval holds the true value with 95% confidence.</p></body></html>\n",
    );
    page
}

/// One result's part of [`html`].
fn section(c: &Combined) -> String {
    let answered = c.nodes.iter().filter(|n| n.failure.is_none()).count();
    let asked = if c.rho > 0.0 {
        format!("rho {} per node", c.rho)
    } else {
        format!("epsilon {} per node", c.epsilon)
    };
    let mut page = format!(
        "<section><p><code>{}</code></p><p>{} · dataset {} · {asked} · {answered}/{} nodes answered{}</p>",
        escape(&c.sql),
        if c.dry_run { "DRY RUN (nothing spent)" } else { "result" },
        escape(&c.dataset),
        c.nodes.len(),
        if c.partial { " · PARTIAL RESULT" } else { "" },
    );
    page.push_str("<h2>Values and 95% intervals</h2><table class=\"result\"><tr>");
    for g in &c.group_by {
        let _ = write!(page, "<th>{}</th>", escape(g));
    }
    for o in &c.outputs {
        let _ = write!(page, "<th>{}</th><th>95% CI</th>", escape(o));
    }
    page.push_str("<th>nodes</th></tr>");
    for r in &c.rows {
        page.push_str("<tr>");
        for k in &r.key {
            let _ = write!(page, "<td>{}</td>", escape(k));
        }
        for e in &r.estimates {
            match e {
                Some(e) => {
                    let _ = write!(
                        page,
                        "<td class=\"n\">{}</td><td>[{}, {}]</td>",
                        number(e.value),
                        number(e.ci_low),
                        number(e.ci_high)
                    );
                }
                None => page.push_str("<td>n/a</td><td></td>"),
            }
        }
        let _ = write!(page, "<td class=\"n\">{}</td></tr>", r.nodes.len());
    }
    page.push_str("</table>");
    if !c.dry_run && !c.rows.is_empty() {
        for s in series(c) {
            let _ = write!(page, "<h2>{}</h2>{}", escape(s.title), svg(&s));
        }
    }
    page.push_str("<h2>Nodes</h2><table class=\"nodes\"><tr><th>node</th><th>status</th><th>cost</th><th>remaining for you</th></tr>");
    for n in &c.nodes {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&n.node),
            escape(
                &n.failure
                    .as_ref()
                    .map_or_else(|| n.status.clone(), |f| f.to_string())
            ),
            n.cost.map(|k| k.amount.to_string()).unwrap_or_default(),
            n.remaining_for_analyst
                .map(|v| format!("{v:.3}"))
                .unwrap_or_default()
        );
    }
    page.push_str("</table>");
    if let Some(p) = &c.post_processing {
        let _ = write!(page, "<p>post-processing: {}</p>", escape(p));
    }
    page.push_str("</section>");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::combine::Row;

    fn est(value: f64, half: f64) -> Option<Estimate> {
        Some(Estimate {
            value,
            ci_low: value - half,
            ci_high: value + half,
        })
    }

    fn result(rows: Vec<(&str, Vec<Option<Estimate>>)>, outputs: &[&str]) -> Combined {
        Combined {
            sql: "SELECT gender, COUNT(*) FROM cases GROUP BY gender".into(),
            query_id: "q".into(),
            epsilon: 0.5,
            rho: 0.0,
            mechanisms: vec!["discrete_laplace".into()],
            dataset: "cases".into(),
            group_by: vec!["gender".into()],
            outputs: outputs.iter().map(|o| o.to_string()).collect(),
            rows: rows
                .into_iter()
                .map(|(k, estimates)| Row {
                    key: vec![k.into()],
                    estimates,
                    nodes: vec!["a".into(), "b".into()],
                })
                .collect(),
            nodes: Vec::new(),
            partial: false,
            dry_run: false,
            released_keys: None,
            post_processing: None,
        }
    }

    /// The `name="..."` attribute values of every element starting with `tag`.
    fn attrs(page: &str, tag: &str, name: &str) -> Vec<f64> {
        page.match_indices(tag)
            .map(|(i, _)| {
                let rest = &page[i..];
                let end = rest.find('>').unwrap();
                let el = &rest[..end];
                let at = el.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                el[at..at + el[at..].find('"').unwrap()].parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn terminal_bars_are_proportional_to_values_with_whiskers() {
        let c = result(
            vec![
                ("Female", vec![est(800.0, 20.0)]),
                ("Male", vec![est(400.0, 20.0)]),
                ("Other", vec![est(100.0, 60.0)]),
                ("(missing)", vec![est(-3.0, 10.0)]),
            ],
            &["COUNT(*)"],
        );
        let text = plot(&c);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 4, "{text}");
        assert!(lines[0].starts_with("COUNT(*)") && lines[0].contains("0 to 820"));
        // 40 cells for 820: the bar is round(value / 820 * 40) cells.
        let bar = |l: &str| l.chars().filter(|&ch| ch == BAR || ch == BAR_IN_CI).count();
        for (line, value) in lines[1..].iter().zip([800.0, 400.0, 100.0, 0.0]) {
            assert_eq!(
                bar(line),
                (value / 820.0 * 40.0_f64).round() as usize,
                "{line}"
            );
        }
        // The whisker: shaded cells inside the bar, a line and ┤ beyond.
        assert!(
            lines[1].contains(BAR_IN_CI) && lines[1].contains('┤'),
            "{text}"
        );
        // 100 ± 60: the interval reaches well past the bar.
        assert!(lines[3].contains(&format!("{WHISKER}{WHISKER}")), "{text}");
        assert!(lines[1].ends_with("800 [780, 820]"), "{text}");
        assert!(lines[4].ends_with("-3 [-13, 7]"), "{text}");
        // Every line has the same bar column width.
        let bars: Vec<usize> = lines[1..]
            .iter()
            .map(|l| l.split('│').nth(1).unwrap().chars().count())
            .collect();
        assert!(bars.iter().all(|&w| w == PLOT_WIDTH), "{bars:?}");
    }

    #[test]
    fn one_chart_per_aggregate_each_on_its_own_scale() {
        let c = result(
            vec![
                ("Female", vec![est(800.0, 10.0), est(12.5, 0.5)]),
                ("Male", vec![est(200.0, 10.0), None]),
            ],
            &["COUNT(*)", "AVG(traffickMonths)"],
        );
        let text = plot(&c);
        assert!(text.contains("COUNT(*)  (bars from 0 to 810"), "{text}");
        assert!(
            text.contains("AVG(traffickMonths)  (bars from 0 to 13"),
            "{text}"
        );
        assert!(text.contains("n/a"), "{text}");
        let mut dry = c.clone();
        dry.dry_run = true;
        assert!(plot(&dry).contains("dry run"));
    }

    #[test]
    fn html_page_has_one_bar_per_row_proportional_to_its_value() {
        let values = [800.0, 400.0, 100.0, 0.0];
        let c = result(
            ["A<b>", "B", "C", "D"]
                .into_iter()
                .zip(values)
                .map(|(k, v)| (k, vec![est(v, 5.0), est(v / 100.0, 0.5)]))
                .collect(),
            &["COUNT(*)", "AVG(x)"],
        );
        let page = html(&[&c]);
        assert!(page.starts_with("<!DOCTYPE html>") && page.trim_end().ends_with("</html>"));
        // Self-contained: nothing loaded from elsewhere.
        assert!(!page.contains("src=") && !page.contains("href="), "{page}");
        assert_eq!(page.matches("<svg").count(), 2, "one chart per aggregate");
        assert_eq!(
            page.matches("<rect class=\"bar\"").count(),
            2 * values.len()
        );
        assert!(page.contains("A&lt;b&gt;") && !page.contains("A<b>"));
        let widths = attrs(&page, "<rect class=\"bar\"", "width");
        let data = attrs(&page, "<rect class=\"bar\"", "data-value");
        // The first chart's scale is 0..805 over SVG_BAR_WIDTH pixels.
        for (w, v) in widths[..4].iter().zip(&data[..4]) {
            assert!(
                (w - v / 805.0 * SVG_BAR_WIDTH).abs() < 0.01,
                "width {w} for {v}"
            );
        }
        // Every whisker spans its interval on the same scale.
        let x1 = attrs(&page, "<line class=\"ci\"", "x1");
        let x2 = attrs(&page, "<line class=\"ci\"", "x2");
        assert_eq!(x1.len(), 2 * values.len());
        for ((a, b), v) in x1[..4].iter().zip(&x2[..4]).zip(values) {
            let scale = SVG_BAR_WIDTH / 805.0;
            assert!((b - a - ((v + 5.0) - (v - 5.0).max(0.0)) * scale).abs() < 0.01);
        }
        assert_eq!(page.matches("<tr>").count(), 1 + values.len() + 1);
    }
}
