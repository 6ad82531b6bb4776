//! The in-memory, column-at-a-time view of a dataset that queries scan.
//!
//! Built from the sled store when the node starts. Each column is a vector
//! of value codes (see [`crate::schema`]). Filters are evaluated a column at
//! a time into three-valued masks; GROUP BY keys are dense indices into the
//! declared domain (plus one "missing" key per column), so every cell of the
//! cross product exists whether or not any row falls in it.
//!
//! Exact results computed here never leave the node: they go straight into
//! [`crate::mechanism`] inside the request's blocking task.

use crate::plan::{CmpOp, MeasurementSpec, Plan, Predicate};
use crate::schema::{Schema, MISSING};

/// Three-valued truth of a condition for one row.
const FALSE: u8 = 0;
const TRUE: u8 = 1;
const UNKNOWN: u8 = 2;

/// A dataset's rows, stored by column.
#[derive(Debug, Clone)]
pub struct Table {
    /// The declared schema the codes were encoded with.
    pub schema: Schema,
    /// One vector of codes per declared column, all of equal length.
    columns: Vec<Vec<i64>>,
}

impl Table {
    /// An empty table for `schema`.
    pub fn new(schema: Schema) -> Table {
        let columns = vec![Vec::new(); schema.columns.len()];
        Table { schema, columns }
    }

    /// Appends rows given in row-major order (`schema.columns.len()` codes a row).
    pub fn append_row_major(&mut self, codes: &[i64]) {
        let width = self.columns.len();
        for row in codes.chunks_exact(width) {
            for (col, &v) in self.columns.iter_mut().zip(row) {
                col.push(v);
            }
        }
    }

    /// Number of rows. Internal only: never released without noise.
    pub(crate) fn len(&self) -> usize {
        self.columns.first().map_or(0, Vec::len)
    }

    /// Computes the exact value of every measurement of `plan`, one vector
    /// per measurement with one value per cell (in cell order, see
    /// [`cell_keys`]). Sums clamp each value to the declared bounds.
    pub(crate) fn exact(&self, plan: &Plan) -> Vec<Vec<i64>> {
        let rows = self.len();
        let mask = match &plan.filter {
            Some(p) => self.eval(p),
            None => vec![TRUE; rows],
        };
        // Cell of each row: mixed radix over the group columns, where each
        // column has its domain plus one trailing "missing" key.
        let mut cell = vec![0usize; rows];
        for (&col, &size) in plan.group_by.iter().zip(&plan.group_sizes) {
            let radix = size + 1;
            for (c, &v) in cell.iter_mut().zip(&self.columns[col]) {
                let key = if v == MISSING { size } else { v as usize };
                *c = *c * radix + key;
            }
        }
        let cells = cell_count(plan);
        plan.measurements
            .iter()
            .map(|m| {
                let mut out = vec![0i64; cells];
                match m {
                    MeasurementSpec::CountRows => {
                        for (i, &t) in mask.iter().enumerate() {
                            out[cell[i]] += i64::from(t == TRUE);
                        }
                    }
                    MeasurementSpec::CountPresent { column } => {
                        for (i, &v) in self.columns[*column].iter().enumerate() {
                            out[cell[i]] += i64::from(mask[i] == TRUE && v != MISSING);
                        }
                    }
                    MeasurementSpec::Sum { column, min, max } => {
                        for (i, &v) in self.columns[*column].iter().enumerate() {
                            if mask[i] == TRUE && v != MISSING {
                                out[cell[i]] = out[cell[i]].saturating_add(v.clamp(*min, *max));
                            }
                        }
                    }
                }
                out
            })
            .collect()
    }

    /// Evaluates a predicate over all rows into a three-valued mask.
    fn eval(&self, p: &Predicate) -> Vec<u8> {
        match p {
            Predicate::And(a, b) => {
                let (mut x, y) = (self.eval(a), self.eval(b));
                for (x, y) in x.iter_mut().zip(y) {
                    *x = match (*x, y) {
                        (FALSE, _) | (_, FALSE) => FALSE,
                        (TRUE, TRUE) => TRUE,
                        _ => UNKNOWN,
                    };
                }
                x
            }
            Predicate::Or(a, b) => {
                let (mut x, y) = (self.eval(a), self.eval(b));
                for (x, y) in x.iter_mut().zip(y) {
                    *x = match (*x, y) {
                        (TRUE, _) | (_, TRUE) => TRUE,
                        (FALSE, FALSE) => FALSE,
                        _ => UNKNOWN,
                    };
                }
                x
            }
            Predicate::Not(a) => {
                let mut x = self.eval(a);
                for x in x.iter_mut() {
                    *x = match *x {
                        TRUE => FALSE,
                        FALSE => TRUE,
                        u => u,
                    };
                }
                x
            }
            Predicate::Cmp { column, op, value } => {
                let value = *value;
                let test: fn(i64, i64) -> bool = match op {
                    CmpOp::Eq => |a, b| a == b,
                    CmpOp::Ne => |a, b| a != b,
                    CmpOp::Lt => |a, b| a < b,
                    CmpOp::Le => |a, b| a <= b,
                    CmpOp::Gt => |a, b| a > b,
                    CmpOp::Ge => |a, b| a >= b,
                };
                self.map_present(*column, |v| test(v, value))
            }
            Predicate::In {
                column,
                values,
                negated,
            } => self.map_present(*column, |v| values.contains(&v) != *negated),
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => self.map_present(*column, |v| (v >= *low && v <= *high) != *negated),
            Predicate::IsMissing { column, negated } => self.columns[*column]
                .iter()
                .map(|&v| u8::from((v == MISSING) != *negated))
                .collect(),
        }
    }

    fn map_present(&self, column: usize, f: impl Fn(i64) -> bool) -> Vec<u8> {
        self.columns[column]
            .iter()
            .map(|&v| {
                if v == MISSING {
                    UNKNOWN
                } else {
                    u8::from(f(v))
                }
            })
            .collect()
    }
}

/// Number of released cells: each GROUP BY column contributes its declared
/// domain plus a "missing" key.
pub fn cell_count(plan: &Plan) -> usize {
    plan.group_sizes.iter().map(|s| s + 1).product()
}

/// Label of the "missing" key of a GROUP BY column.
pub const MISSING_KEY: &str = "(missing)";

/// The printable key of every cell, in the order of [`Table::exact`]'s values.
pub fn cell_keys(plan: &Plan, schema: &Schema) -> Vec<Vec<String>> {
    let mut keys: Vec<Vec<String>> = vec![Vec::new()];
    for (&col, &size) in plan.group_by.iter().zip(&plan.group_sizes) {
        let column = &schema.columns[col];
        let mut next = Vec::with_capacity(keys.len() * (size + 1));
        for k in &keys {
            for code in 0..=size {
                let mut key = k.clone();
                key.push(if code == size {
                    MISSING_KEY.to_string()
                } else {
                    column.key_label(code)
                });
                next.push(key);
            }
        }
        keys = next;
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::schema::{ColumnSpec, ColumnType};

    fn table() -> Table {
        let schema = Schema::from_specs(
            "t",
            &[
                ColumnSpec {
                    name: "g".into(),
                    kind: ColumnType::Categorical,
                    domain: Some(vec!["a".into(), "b".into()]),
                    min: None,
                    max: None,
                },
                ColumnSpec {
                    name: "f".into(),
                    kind: ColumnType::Boolean,
                    domain: None,
                    min: None,
                    max: None,
                },
                ColumnSpec {
                    name: "m".into(),
                    kind: ColumnType::Integer,
                    domain: None,
                    min: Some(0),
                    max: Some(10),
                },
            ],
        )
        .unwrap();
        let mut t = Table::new(schema);
        t.append_row_major(&[
            0, 1, 5, //
            0, 0, 7, //
            1, 1, MISSING, //
            MISSING, 1, 3, //
            1, MISSING, 10,
        ]);
        t
    }

    #[test]
    fn grouped_counts_include_missing_and_empty_keys() {
        let t = table();
        let p = plan(
            "SELECT g, COUNT(*), SUM(m), AVG(m) FROM t WHERE f = 1 GROUP BY g",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(
            cell_keys(&p, &t.schema),
            vec![vec!["a"], vec!["b"], vec![MISSING_KEY]]
        );
        let exact = t.exact(&p);
        assert_eq!(exact[0], vec![1, 1, 1]); // COUNT(*) where f = 1
        assert_eq!(exact[1], vec![5, 0, 3]); // SUM(m)
        assert_eq!(exact[2], vec![1, 0, 1]); // COUNT(m)
    }

    #[test]
    fn three_valued_not_excludes_missing() {
        let t = table();
        let p = plan("SELECT COUNT(*) FROM t WHERE NOT f = 1", &t.schema, 100).unwrap();
        assert_eq!(t.exact(&p), vec![vec![1]]);
        let p = plan(
            "SELECT COUNT(*) FROM t WHERE f IS NULL OR m BETWEEN 6 AND 9",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(t.exact(&p), vec![vec![2]]);
        let p = plan(
            "SELECT COUNT(*) FROM t WHERE g NOT IN ('a')",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(t.exact(&p), vec![vec![2]]);
    }
}
