//! What a plan releases: each SELECT item's [`Output`] and the distinct
//! noisy vectors ([`MeasurementSpec`]) it is read off, with each vector's
//! sensitivity from declared bounds alone (the per-aggregate parts live in
//! `aggregate`).

use super::predicate::Predicate;
use super::row_expr::RowExpr;

use crate::schema::Schema;

/// What one item of the SELECT list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// `COUNT(*)` or `COUNT(col)`.
    Count,
    /// `SUM(col)` of values clamped to the declared bounds.
    Sum,
    /// `AVG(col)`: a noisy sum divided by a noisy count of non-missing values.
    Avg,
    /// `QUANTILE(col, q)` / `MEDIAN(col)`: read off the noisy histogram over
    /// the column's declared bins (a noisy CDF).
    Quantile,
    /// `HISTOGRAM(col, k)`: noisy counts of `k` equal-width bins.
    Histogram,
    /// `VARIANCE(col)`: sample variance from a noisy count, sum and centred
    /// sum of squares.
    Variance,
    /// `STDDEV(col)`: the square root of [`OutputKind::Variance`].
    Stddev,
}

/// One aggregate of the SELECT list, mapped to the measurements it needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// As the analyst wrote it (normalised), e.g. `AVG(traffickMonths)`.
    pub label: String,
    /// What is computed from the measurements.
    pub kind: OutputKind,
    /// The count (COUNT) or the sum (SUM, AVG) measurement.
    pub measurement: usize,
    /// AVG only: the count of non-missing values.
    pub count_measurement: Option<usize>,
    /// SUM, AVG, QUANTILE, HISTOGRAM, VARIANCE, STDDEV: the declared
    /// bounds values are clamped to.
    pub bounds: Option<(i64, i64)>,
    /// QUANTILE: which quantile, in `[0, 1]`.
    pub quantile: Option<f64>,
    /// VARIANCE and STDDEV: the centred sum of squares measurement and its
    /// centre.
    pub squares: Option<(usize, i64)>,
}

/// One vector of values released with noise: one value per cell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeasurementSpec {
    /// Number of records in the cell.
    CountRows,
    /// Number of records in the cell for which a condition is TRUE:
    /// `COUNT(*) FILTER (WHERE c)`, `SUM(CASE WHEN c THEN 1 ELSE 0 END)`.
    CountWhere {
        /// The condition, as in WHERE.
        condition: Predicate,
        /// The condition as written (for labels).
        text: String,
    },
    /// Number of records in the cell whose column is not missing.
    CountPresent {
        /// Column index.
        column: usize,
    },
    /// Sum of the column clamped to `[min, max]`; missing values add nothing.
    Sum {
        /// Column index.
        column: usize,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
    },
    /// Sum of a per-row expression (`SUM(a + b)`, `SUM(COALESCE(x, 0))`),
    /// each value clamped to `[min, max]`, the bounds derived from the
    /// declared bounds by interval arithmetic ([`RowExpr::bounds`]); rows
    /// where the expression is NULL add nothing.
    SumOf {
        /// The expression.
        expr: RowExpr,
        /// The expression as written (for labels).
        text: String,
        /// Derived lower bound.
        min: i64,
        /// Derived upper bound.
        max: i64,
    },
    /// Number of records in the cell where a per-row expression is not
    /// NULL (the count AVG of an expression divides by).
    CountOf {
        /// The expression.
        expr: RowExpr,
        /// The expression as written (for labels).
        text: String,
    },
    /// Per cell, the number of non-missing values in each of `bins`
    /// equal-width bins over `[min, max]` (see [`fedq_dp::distribution`]):
    /// `bins` values per cell, cell-major.
    Histogram {
        /// Column index.
        column: usize,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
        /// Number of bins.
        bins: u64,
    },
    /// Sum of `(x - center)^2` over non-missing values, `x` clamped to
    /// `[min, max]`; `center` is the middle of the bounds, which makes the
    /// sensitivity a quarter of that of the raw squares.
    SumSquares {
        /// Column index.
        column: usize,
        /// Centre the squares are taken around.
        center: i64,
        /// Declared lower bound.
        min: i64,
        /// Declared upper bound.
        max: i64,
    },
}

impl MeasurementSpec {
    /// Values released per cell (the number of bins for histograms).
    pub fn values_per_cell(&self) -> usize {
        match self {
            MeasurementSpec::Histogram { bins, .. } => *bins as usize,
            _ => 1,
        }
    }

    /// L1 sensitivity of the whole vector of cell values under adding or
    /// removing one record (the privacy unit). Each record falls in exactly
    /// one cell, so the vector's sensitivity equals one cell's:
    /// 1 for counts and histograms (a record falls in one bin of one cell),
    /// `max(|min|, |max|)` for clamped sums, `max((min-c)^2, (max-c)^2)` for
    /// centred squares. Computed from declared bounds only (DESIGN invariant
    /// 4). Per record: [`Plan::sensitivity`] scales it to the privacy unit.
    pub fn sensitivity(&self) -> i64 {
        self.one_record_change()
    }

    /// L2 sensitivity of the vector of cell values under adding or removing
    /// one record, for the discrete Gaussian. One record changes one cell
    /// by at most [`Self::one_record_change`], so L2 equals L1 here. When a
    /// privacy unit may contribute K records (person-level privacy), both
    /// sensitivities become K times this; K records can spread over K
    /// cells, whose exact L2 (`sqrt(K)` times the change) needs that
    /// structure, so `K * L1 >= L2` is the conservative choice.
    pub fn l2_sensitivity(&self) -> i64 {
        self.one_record_change()
    }

    /// The most one record can change the one cell it falls in: 1 for a
    /// count, `max(|min|, |max|)` for a clamped sum (declared bounds only).
    fn one_record_change(&self) -> i64 {
        match self {
            MeasurementSpec::CountRows
            | MeasurementSpec::CountWhere { .. }
            | MeasurementSpec::CountPresent { .. }
            | MeasurementSpec::CountOf { .. }
            | MeasurementSpec::Histogram { .. } => super::aggregate::count::SENSITIVITY,
            MeasurementSpec::Sum { min, max, .. } | MeasurementSpec::SumOf { min, max, .. } => {
                super::aggregate::sum::sensitivity(*min, *max)
            }
            MeasurementSpec::SumSquares {
                center, min, max, ..
            } => super::aggregate::variance::squares_sensitivity(*center, *min, *max),
        }
    }

    /// Label shown to the analyst, e.g. `SUM(traffickMonths)`.
    pub fn label(&self, schema: &Schema) -> String {
        match self {
            MeasurementSpec::CountRows => "COUNT(*)".into(),
            MeasurementSpec::CountWhere { text, .. } => format!("COUNT(*) FILTER (WHERE {text})"),
            MeasurementSpec::CountPresent { column } => {
                format!("COUNT({})", schema.columns[*column].name())
            }
            MeasurementSpec::Sum { column, .. } => {
                format!("SUM({})", schema.columns[*column].name())
            }
            MeasurementSpec::Histogram { column, bins, .. } => {
                format!("HISTOGRAM({}, {bins})", schema.columns[*column].name())
            }
            MeasurementSpec::SumOf { text, .. } => format!("SUM({text})"),
            MeasurementSpec::CountOf { text, .. } => format!("COUNT({text})"),
            MeasurementSpec::SumSquares { column, center, .. } => {
                format!("SUM(({} - {center})^2)", schema.columns[*column].name())
            }
        }
    }
}
