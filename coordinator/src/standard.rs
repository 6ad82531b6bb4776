//! Whether the nodes asked agree on the data standard, checked from their
//! `Describe` before anything is sent or spent ([`screen`]), and the
//! column-by-column differences `fedq schema --diff` shows ([`differences`]).
//!
//! **The rule.** Among the nodes serving the query's dataset:
//!
//! 1. The *reference* is the standard (name and major version) most of them
//!    follow (the earliest in the federation file on a tie; "no standard"
//!    counts as one). A node following another name or major version, or
//!    none while the reference is one (or one while most follow none), is
//!    left out and named with what it follows.
//! 2. Nodes stating the same version with different digests hold different
//!    files under one version: those not holding the digest most of them
//!    state are left out.
//! 3. Minor versions only add, but the coordinator checks rather than
//!    trusts that: the declaration of the newest version among the
//!    reference nodes is compared column by column with each other node's.
//!    A node is kept if the query plans on the columns the two declare
//!    identically (so it reads only columns both versions share, with the
//!    same domain, bounds and bins); otherwise it is left out, naming the
//!    columns the query reads that differ and how.
//!
//! When no node serving the dataset states a standard, nothing is checked
//! here (each node's own schema, as before; the answer checks of
//! [`crate::verify`] still apply).

use std::collections::HashMap;

use fedq_plan::standard::Version;
use fedq_proto::v1::{column_schema::Kind, ColumnSchema, DatasetSchema, DescribeResponse};

use crate::client::{Failure, Outcome};
use crate::federation::NodeEntry;

/// What one node's dataset states: `(name, version, digest)`, or `None`.
type Stated = Option<(String, Version, String)>;

/// A standard's name and major version (nodes combined only within one),
/// or `None` for no standard.
type Family = Option<(String, u32)>;

fn stated(ds: &DatasetSchema) -> Stated {
    let s = ds.standard.as_ref()?;
    // An unreadable version is a version no other node shares.
    let v = Version::parse(&s.version).unwrap_or(Version {
        major: u32::MAX,
        minor: u32::MAX,
    });
    Some((s.name.clone(), v, s.digest.clone()))
}

fn show(s: &Stated) -> String {
    match s {
        None => "no data standard".to_string(),
        Some((n, v, _)) => format!("standard {n} {v}"),
    }
}

fn short(digest: &str) -> String {
    digest.chars().take(12).collect()
}

/// Leaves out, before anything is sent, the nodes whose dataset does not
/// follow the reference standard, or whose declaration differs from the
/// newest reference version in a column the query reads (see the module
/// doc). Returns the nodes kept and, for the others, why.
pub fn screen(
    described: Vec<(NodeEntry, DescribeResponse)>,
    sql: &str,
) -> (Vec<(NodeEntry, DescribeResponse)>, Vec<Outcome<()>>) {
    let Ok(dataset) = fedq_plan::plan::dataset_of(sql) else {
        return (described, Vec::new());
    };
    let ds_of = |d: &DescribeResponse| d.datasets.iter().position(|ds| ds.name == dataset);
    let serving: Vec<usize> = (0..described.len())
        .filter(|&i| ds_of(&described[i].1).is_some())
        .collect();
    let stated_of = |i: usize| {
        let d = &described[i].1;
        stated(&d.datasets[ds_of(d).unwrap_or(0)])
    };
    if serving.iter().all(|&i| stated_of(i).is_none()) {
        return (described, Vec::new());
    }
    let mut why: HashMap<usize, String> = HashMap::new();
    // 1. The reference standard: name and major version.
    let family = |s: &Stated| s.as_ref().map(|(n, v, _)| (n.clone(), v.major));
    // Each family with how many nodes follow it, in federation order.
    let mut families: Vec<(Family, usize)> = Vec::new();
    for &i in &serving {
        let f = family(&stated_of(i));
        match families.iter_mut().find(|(g, _)| *g == f) {
            Some((_, n)) => *n += 1,
            None => families.push((f, 1)),
        }
    }
    // The most followed; the earliest on a tie.
    let (reference, count) = families
        .iter()
        .fold(None::<&(Family, usize)>, |best, g| match best {
            Some(b) if b.1 >= g.1 => Some(b),
            _ => Some(g),
        })
        .cloned()
        .unwrap_or((None, 0));
    let ref_text = match &reference {
        None => "no data standard".to_string(),
        Some((n, major)) => format!("standard {n} {major}.x"),
    };
    for &i in &serving {
        let s = stated_of(i);
        if family(&s) != reference {
            why.insert(
                i,
                format!(
                    "skipped: its dataset {dataset:?} follows {}, while {count} of the {} nodes serving it follow {ref_text} (the same standard name and major version are needed to add up their cells); nothing was sent to it",
                    show(&s),
                    serving.len()
                ),
            );
        }
    }
    if reference.is_none() {
        return split(described, why);
    }
    // 2. One digest per version: the most common among the reference nodes.
    let kept: Vec<usize> = serving
        .iter()
        .copied()
        .filter(|i| !why.contains_key(i))
        .collect();
    let mut digests: Vec<((Version, String), usize)> = Vec::new();
    for &i in &kept {
        if let Some((_, v, d)) = stated_of(i) {
            match digests.iter_mut().find(|(k, _)| *k == (v, d.clone())) {
                Some((_, n)) => *n += 1,
                None => digests.push(((v, d), 1)),
            }
        }
    }
    for &i in &kept {
        let Some((name, v, d)) = stated_of(i) else {
            continue;
        };
        let best = digests.iter().filter(|((w, _), _)| *w == v).fold(
            None::<&((Version, String), usize)>,
            |b, x| match b {
                Some(b) if b.1 >= x.1 => Some(b),
                _ => Some(x),
            },
        );
        if let Some(((_, bd), n)) = best {
            if *bd != d {
                why.insert(
                    i,
                    format!(
                        "skipped: it states standard {name} {v} with digest {}, while {n} node(s) state {name} {v} with digest {}: two different files carry one version; ask its operator to install the federation's standard file (fedq-node check prints its digest); nothing was sent to it",
                        short(&d),
                        short(bd)
                    ),
                );
            }
        }
    }
    // 3. Column by column against the newest version's declaration.
    let kept: Vec<usize> = kept.into_iter().filter(|i| !why.contains_key(i)).collect();
    let newest = kept.iter().copied().max_by(|&a, &b| {
        let va = stated_of(a).map(|s| s.1);
        let vb = stated_of(b).map(|s| s.1);
        // The earliest node of the newest version.
        va.cmp(&vb).then(b.cmp(&a))
    });
    if let Some(r) = newest {
        let rd = &described[r];
        let reference_ds = &rd.1.datasets[ds_of(&rd.1).unwrap_or(0)];
        let ref_stated = show(&stated_of(r));
        for &i in &kept {
            if i == r {
                continue;
            }
            let d = &described[i].1;
            let mine = &d.datasets[ds_of(d).unwrap_or(0)];
            if let Some(w) = columns_read_that_differ(sql, reference_ds, mine) {
                why.insert(
                    i,
                    format!(
                        "skipped: it follows {}, and the query reads {w} (compared with {ref_stated} on {}); its answer could not be added to theirs; nothing was sent to it",
                        show(&stated_of(i)),
                        rd.0.name
                    ),
                );
            }
        }
    }
    split(described, why)
}

/// `None` when `sql` plans on the columns `reference` and `mine` declare
/// identically (with the same privacy unit); else the columns it reads
/// that differ, and how.
fn columns_read_that_differ(
    sql: &str,
    reference: &DatasetSchema,
    mine: &DatasetSchema,
) -> Option<String> {
    if reference.columns == mine.columns && reference.privacy_unit == mine.privacy_unit {
        return None;
    }
    if reference.privacy_unit != mine.privacy_unit {
        return Some(format!(
            "every column under another privacy unit ({:?}, not {:?})",
            mine.privacy_unit, reference.privacy_unit
        ));
    }
    let same = |c: &ColumnSchema| mine.columns.iter().any(|m| m == c);
    let plans = |columns: Vec<ColumnSchema>| {
        let ds = DatasetSchema {
            columns,
            ..reference.clone()
        };
        crate::verify::schema_from_proto(&ds)
            .ok()
            .and_then(|s| fedq_plan::plan::plan(sql, &s, usize::MAX).ok())
            .is_some()
    };
    let shared: Vec<ColumnSchema> = reference
        .columns
        .iter()
        .filter(|c| same(c))
        .cloned()
        .collect();
    if plans(shared) {
        return None;
    }
    // The differing columns the query cannot do without.
    let read: Vec<String> = reference
        .columns
        .iter()
        .filter(|c| !same(c))
        .filter(|c| {
            !plans(
                reference
                    .columns
                    .iter()
                    .filter(|o| o.name != c.name)
                    .cloned()
                    .collect(),
            )
        })
        .map(|c| {
            let theirs = mine.columns.iter().find(|m| m.name == c.name);
            format!("{} ({})", c.name, column_difference(c, theirs))
        })
        .collect();
    Some(if read.is_empty() {
        "columns it declares differently".to_string()
    } else {
        read.join(", ")
    })
}

/// How `theirs` differs from `reference` (same name), in words.
pub fn column_difference(reference: &ColumnSchema, theirs: Option<&ColumnSchema>) -> String {
    let Some(theirs) = theirs else {
        return "it does not declare it".to_string();
    };
    match (&reference.kind, &theirs.kind) {
        (Some(Kind::Categorical(a)), Some(Kind::Categorical(b))) => {
            let only_ref: Vec<&str> = a
                .domain
                .iter()
                .filter(|v| !b.domain.contains(v))
                .map(String::as_str)
                .collect();
            let only_mine: Vec<&str> = b
                .domain
                .iter()
                .filter(|v| !a.domain.contains(v))
                .map(String::as_str)
                .collect();
            let mut parts = Vec::new();
            if !only_ref.is_empty() {
                parts.push(format!("it lacks {}", quoted_list(&only_ref)));
            }
            if !only_mine.is_empty() {
                parts.push(format!("it adds {}", quoted_list(&only_mine)));
            }
            if a.open != b.open {
                parts.push(if b.open {
                    "its domain is open".to_string()
                } else {
                    "its domain is closed".to_string()
                });
            }
            if parts.is_empty() {
                "its domain lists the values in another order".to_string()
            } else {
                parts.join(", ")
            }
        }
        (Some(Kind::Integer(a)), Some(Kind::Integer(b))) => {
            if (a.min, a.max) != (b.min, b.max) {
                format!(
                    "bounds {}..{} where the reference has {}..{}",
                    b.min, b.max, a.min, a.max
                )
            } else {
                format!("{} bins where the reference has {}", b.bins, a.bins)
            }
        }
        (_, k) => format!(
            "it is {} where the reference's is {}",
            kind_name(k.as_ref()),
            kind_name(reference.kind.as_ref())
        ),
    }
}

fn kind_name(k: Option<&Kind>) -> &'static str {
    match k {
        Some(Kind::Categorical(_)) => "categorical",
        Some(Kind::Integer(_)) => "integer",
        Some(Kind::Boolean(_)) => "boolean",
        None => "untyped",
    }
}

fn quoted_list(values: &[&str]) -> String {
    let shown: Vec<String> = values.iter().take(6).map(|v| format!("{v:?}")).collect();
    let more = values.len().saturating_sub(6);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn split(
    described: Vec<(NodeEntry, DescribeResponse)>,
    why: HashMap<usize, String>,
) -> (Vec<(NodeEntry, DescribeResponse)>, Vec<Outcome<()>>) {
    let mut kept = Vec::with_capacity(described.len());
    let mut left_out = Vec::new();
    for (i, (entry, d)) in described.into_iter().enumerate() {
        match why.get(&i) {
            None => kept.push((entry, d)),
            Some(w) => {
                tracing::warn!(node = %entry.name, why = %w, "left out before the query");
                left_out.push(Outcome {
                    node: entry.name,
                    result: Err(Failure::Refused(w.clone())),
                    elapsed: std::time::Duration::ZERO,
                })
            }
        }
    }
    (kept, left_out)
}

/// One row of `fedq schema --diff`: a column (or the standard itself) of
/// one dataset that the nodes serving it do not all declare the same.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    /// The dataset.
    pub dataset: String,
    /// The column, or `(standard)` / `(privacy unit)`.
    pub column: String,
    /// Per node serving the dataset, in federation order: its declaration
    /// in words, or `None` where it does not declare the column.
    pub nodes: Vec<(String, Option<String>)>,
}

/// A column's declaration in words, for `--diff`.
pub fn declaration(c: &ColumnSchema) -> String {
    match &c.kind {
        Some(Kind::Categorical(k)) if k.open => "categorical (open)".to_string(),
        Some(Kind::Categorical(k)) => format!("categorical [{}]", k.domain.join(", ")),
        Some(Kind::Integer(i)) => format!("integer {}..{} ({} bins)", i.min, i.max, i.bins),
        Some(Kind::Boolean(_)) => "boolean".to_string(),
        None => "untyped".to_string(),
    }
}

/// The column-by-column differences between the nodes' declarations of
/// each dataset served by more than one node (datasets in the order first
/// seen, columns in the order first declared).
pub fn differences(outcomes: &[Outcome<DescribeResponse>]) -> Vec<Difference> {
    let described: Vec<(&str, &DescribeResponse)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|d| (o.node.as_str(), d)))
        .collect();
    let mut datasets: Vec<&str> = Vec::new();
    for (_, d) in &described {
        for ds in &d.datasets {
            if !datasets.contains(&ds.name.as_str()) {
                datasets.push(&ds.name);
            }
        }
    }
    let mut out = Vec::new();
    for name in datasets {
        let serving: Vec<(&str, &DatasetSchema)> = described
            .iter()
            .filter_map(|(n, d)| {
                d.datasets
                    .iter()
                    .find(|ds| ds.name == name)
                    .map(|ds| (*n, ds))
            })
            .collect();
        if serving.len() < 2 {
            continue;
        }
        let mut push = |column: &str, nodes: Vec<(String, Option<String>)>| {
            let first = &nodes[0].1;
            if nodes.iter().any(|(_, v)| v != first) {
                out.push(Difference {
                    dataset: name.to_string(),
                    column: column.to_string(),
                    nodes,
                });
            }
        };
        push(
            "(standard)",
            serving
                .iter()
                .map(|(n, ds)| {
                    let s = ds
                        .standard
                        .as_ref()
                        .map(|s| format!("{} {} ({})", s.name, s.version, short(&s.digest)))
                        .unwrap_or_else(|| "none".to_string());
                    (n.to_string(), Some(s))
                })
                .collect(),
        );
        push(
            "(privacy unit)",
            serving
                .iter()
                .map(|(n, ds)| (n.to_string(), Some(ds.privacy_unit.clone())))
                .collect(),
        );
        let mut columns: Vec<&str> = Vec::new();
        for (_, ds) in &serving {
            for c in &ds.columns {
                if !columns.contains(&c.name.as_str()) {
                    columns.push(&c.name);
                }
            }
        }
        for c in columns {
            push(
                c,
                serving
                    .iter()
                    .map(|(n, ds)| {
                        (
                            n.to_string(),
                            ds.columns.iter().find(|x| x.name == c).map(declaration),
                        )
                    })
                    .collect(),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_engine::synth;
    use fedq_plan::schema::Schema;
    use fedq_proto::v1::{CategoricalColumn, DataStandard};

    fn node(
        name: &str,
        standard: Option<(&str, &str, &str)>,
        extra: bool,
    ) -> (NodeEntry, DescribeResponse) {
        let schema = Schema::from_specs("cases", &synth::ctdc_columns()).unwrap();
        let mut columns = schema.to_proto();
        if extra {
            columns.push(ColumnSchema {
                name: "isAbduction".into(),
                kind: Some(Kind::Boolean(Default::default())),
            });
            if let Some(Kind::Categorical(c)) = &mut columns[1].kind {
                c.domain.push("Government".into());
            }
        }
        (
            NodeEntry {
                name: name.into(),
                endpoint: "https://127.0.0.1:1".into(),
            },
            DescribeResponse {
                node_name: name.into(),
                datasets: vec![DatasetSchema {
                    name: "cases".into(),
                    columns,
                    privacy_unit: "record".into(),
                    measure: "pure".into(),
                    standard: standard.map(|(n, v, d)| DataStandard {
                        name: n.into(),
                        version: v.into(),
                        digest: d.into(),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        )
    }

    fn names(kept: &[(NodeEntry, DescribeResponse)]) -> Vec<&str> {
        kept.iter().map(|(e, _)| e.name.as_str()).collect()
    }

    #[test]
    fn the_reference_family_digest_and_columns_decide_who_is_asked() {
        let fed = || {
            vec![
                node("a", Some(("ctdc", "1.1", "d11")), true),
                node("b", Some(("ctdc", "1.1", "d11")), true),
                node("c", Some(("ctdc", "1.0", "d10")), false),
                node("d", Some(("ctdc", "2.0", "d20")), false),
                node("e", Some(("ctdc", "1.1", "other")), true),
                node("f", None, false),
            ]
        };
        let (kept, out) = screen(fed(), "SELECT gender, COUNT(*) FROM cases GROUP BY gender");
        assert_eq!(names(&kept), ["a", "b", "c"]);
        let why: HashMap<&str, String> = out
            .iter()
            .map(|o| (o.node.as_str(), o.result.clone().unwrap_err().to_string()))
            .collect();
        assert!(
            why["d"].contains("follows standard ctdc 2.0, while 4 of the 6"),
            "{}",
            why["d"]
        );
        assert!(
            why["f"].contains("follows no data standard"),
            "{}",
            why["f"]
        );
        assert!(
            why["e"].contains("digest other")
                && why["e"].contains("2 node(s) state ctdc 1.1 with digest d11"),
            "{}",
            why["e"]
        );

        let (kept, out) = screen(
            fed(),
            "SELECT Datasource, COUNT(*) FROM cases GROUP BY Datasource",
        );
        assert_eq!(names(&kept), ["a", "b"]);
        let c = out
            .iter()
            .find(|o| o.node == "c")
            .unwrap()
            .result
            .clone()
            .unwrap_err()
            .to_string();
        assert!(
            c.contains("Datasource (it lacks \"Government\")") && c.contains("ctdc 1.1 on a"),
            "{c}"
        );
        let (kept, _) = screen(
            fed(),
            "SELECT COUNT(*) FROM cases WHERE isAbduction = 1 OR gender = 'Male'",
        );
        assert_eq!(names(&kept), ["a", "b"]);
        // Another dataset, or no standard anywhere: nothing is checked.
        let (kept, out) = screen(fed(), "SELECT COUNT(*) FROM other");
        assert_eq!((kept.len(), out.len()), (6, 0));
        let plain = vec![node("x", None, false), node("y", None, true)];
        let (kept, out) = screen(
            plain,
            "SELECT Datasource, COUNT(*) FROM cases GROUP BY Datasource",
        );
        assert_eq!((kept.len(), out.len()), (2, 0));
    }

    #[test]
    fn differences_name_each_column_that_differs_and_where_it_is_missing() {
        let outcomes: Vec<Outcome<DescribeResponse>> = [
            node("a", Some(("ctdc", "1.1", "d11")), true),
            node("c", Some(("ctdc", "1.0", "d10")), false),
        ]
        .into_iter()
        .map(|(e, d)| Outcome {
            node: e.name,
            result: Ok(d),
            elapsed: std::time::Duration::ZERO,
        })
        .collect();
        let d = differences(&outcomes);
        let cols: Vec<&str> = d.iter().map(|x| x.column.as_str()).collect();
        assert_eq!(cols, ["(standard)", "Datasource", "isAbduction"]);
        assert_eq!(d[2].nodes[1], ("c".to_string(), None));
        assert_eq!(
            column_difference(
                &ColumnSchema {
                    name: "g".into(),
                    kind: Some(Kind::Categorical(CategoricalColumn {
                        domain: vec!["A".into(), "B".into()],
                        open: false
                    }))
                },
                Some(&ColumnSchema {
                    name: "g".into(),
                    kind: Some(Kind::Categorical(CategoricalColumn {
                        domain: vec!["A".into(), "C".into()],
                        open: false
                    }))
                })
            ),
            "it lacks \"B\", it adds \"C\""
        );
    }
}
