//! The in-memory, compact columnar view of a dataset that queries scan.
//!
//! Built from the sled store when the node starts. Each declared column is
//! packed by its declared (public) metadata, never by the data:
//!
//! - a value is stored as its *offset* from the column's base (0 for
//!   categorical and boolean columns, so the offset is the domain index;
//!   `min` for integer columns);
//! - the offset one past the last valid one (the domain size, 2, or
//!   `max - min + 1`) means *missing*: validity is kept inline, in the same
//!   vector, so a GROUP BY key is the stored offset itself (the "missing"
//!   key of a group column is its last key);
//! - the narrowest unsigned integer that holds every offset and the missing
//!   code is used: `u8` for booleans, small domains and ranges such as years
//!   or months, then `u16`, `u32`, `u64`. A CTDC-shaped row takes 29 bytes
//!   rather than 29 `i64`s.
//!
//! Queries run a column at a time. A WHERE clause becomes two bitmaps per
//! predicate (rows where it is TRUE, rows where it is FALSE; the rest are
//! UNKNOWN), so SQL's three-valued AND, OR and NOT are word operations.
//! A comparison on a column turns into a range or a set of offsets, tested
//! with one unsigned comparison per value. GROUP BY keys are dense indices
//! into the declared-domain cross product (mixed radix, each column with its
//! missing key), so every cell exists whether or not any row falls in it.
//!
//! Exact results computed here never leave the node: outside this crate
//! they exist only as [`Exact`] (and [`ExactKeyCounts`]) values, which
//! nothing but a mechanism of [`fedq_dp::mechanism`] can read.

use std::borrow::Cow;
use std::sync::OnceLock;

use crate::bits::{self, KeyBits};
use fedq_dp::mechanism::{Exact, ExactKeyCounts};
use fedq_plan::plan::{
    cell_count, Bucket, CmpOp, KeyRule, MeasurementSpec, Plan, Predicate, MISSING_KEY,
};
use fedq_plan::schema::{Column, Schema, MISSING};

/// An unsigned code type a column can be packed in.
trait Code: Copy + Eq + Ord + Send + Sync + 'static {
    /// Bytes per value in the stored chunk encoding.
    const WIDTH: usize;
    /// Truncating conversion; callers only pass values that fit.
    fn from_u64(v: u64) -> Self;
    fn to_u64(self) -> u64;
    fn wrapping_sub(self, o: Self) -> Self;
    fn read_le(b: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! impl_code {
    ($t:ty) => {
        impl Code for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn from_u64(v: u64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_u64(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn wrapping_sub(self, o: Self) -> Self {
                <$t>::wrapping_sub(self, o)
            }
            #[inline(always)]
            fn read_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
            #[inline(always)]
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
impl_code!(u8);
impl_code!(u16);
impl_code!(u32);
impl_code!(u64);

/// A column's offsets, in the narrowest type that holds them.
#[derive(Debug, Clone)]
enum Codes {
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
}

/// Runs `$body` with `$v` bound to the typed vector (or slice) of `$codes`.
macro_rules! with_codes {
    ($codes:expr, $v:ident => $body:expr) => {
        match $codes {
            Codes::U8($v) => $body,
            Codes::U16($v) => $body,
            Codes::U32($v) => $body,
            Codes::U64($v) => $body,
        }
    };
}

/// One packed column.
#[derive(Debug, Clone)]
struct Packed {
    /// The value of offset 0 (declared `min` for integers, else 0).
    base: i64,
    /// Number of valid offsets; offset `span` is the missing code.
    span: u64,
    /// The offsets, one per row.
    codes: Codes,
}

/// How a declared column is packed: `(base, span)`. Public metadata only.
fn layout(column: &Column) -> (i64, u64) {
    match column {
        Column::Categorical { domain, .. } => (0, domain.len() as u64),
        Column::Boolean { .. } => (0, 2),
        // Bounds lie within ±2^40 (see `schema.rs`), so this cannot overflow.
        Column::Integer { min, max, .. } => (*min, (*max - *min) as u64 + 1),
        // 63-bit hashes; the missing code 2^63 is never used by a hash.
        Column::PersonId { .. } | Column::Open { .. } => (0, 1 << 63),
    }
}

impl Packed {
    fn new(column: &Column) -> Packed {
        let (base, span) = layout(column);
        // The missing code `span` must fit too.
        let codes = if span <= u64::from(u8::MAX) {
            Codes::U8(Vec::new())
        } else if span <= u64::from(u16::MAX) {
            Codes::U16(Vec::new())
        } else if span <= u64::from(u32::MAX) {
            Codes::U32(Vec::new())
        } else {
            Codes::U64(Vec::new())
        };
        Packed { base, span, codes }
    }

    fn len(&self) -> usize {
        with_codes!(&self.codes, v => v.len())
    }

    fn width(&self) -> usize {
        match &self.codes {
            Codes::U8(_) => 1,
            Codes::U16(_) => 2,
            Codes::U32(_) => 4,
            Codes::U64(_) => 8,
        }
    }

    /// The offset of value code `v` (a [`fedq_plan::schema`] code), or `None`
    /// when it lies outside the declared domain or bounds.
    fn offset(&self, v: i64) -> Option<u64> {
        if v == MISSING {
            return Some(self.span);
        }
        let off = i128::from(v) - i128::from(self.base);
        (0..i128::from(self.span))
            .contains(&off)
            .then_some(off as u64)
    }

    fn push(&mut self, offset: u64) {
        with_codes!(&mut self.codes, v => v.push(Code::from_u64(offset)));
    }

    fn reserve(&mut self, n: usize) {
        with_codes!(&mut self.codes, v => v.reserve(n));
    }

    /// Appends `rows` little-endian offsets of this column's width from
    /// `bytes`, checking each is a valid offset or the missing code.
    fn extend_le(&mut self, bytes: &[u8]) -> Result<(), String> {
        let span = self.span;
        with_codes!(&mut self.codes, v => extend_le(v, bytes, span))
    }
}

fn extend_le<T: Code>(v: &mut Vec<T>, bytes: &[u8], span: u64) -> Result<(), String> {
    let start = v.len();
    v.extend(bytes.chunks_exact(T::WIDTH).map(T::read_le));
    let max = T::from_u64(span);
    if v[start..].iter().any(|&c| c > max) {
        v.truncate(start);
        return Err("a stored value lies outside its column's declared domain or bounds".into());
    }
    Ok(())
}

/// A set of rows, one bit per row; bits past the last row are always 0.
type Bits = Vec<u64>;

/// A comparison, as a test on a column's offsets (missing excluded).
enum Test {
    /// No valid offset satisfies it.
    Never,
    /// Offsets in `lo..=hi` (with `hi < span`).
    Range { lo: u64, hi: u64 },
    /// Offsets listed (sorted, all `< span`).
    Set(Vec<u64>),
}

impl Test {
    /// The offsets whose values lie in `[low, high]` (value space).
    fn range(p: &Packed, low: i128, high: i128) -> Test {
        let first = i128::from(p.base);
        let last = first + i128::from(p.span) - 1;
        let (lo, hi) = (low.max(first), high.min(last));
        if lo > hi {
            Test::Never
        } else {
            Test::Range {
                lo: (lo - first) as u64,
                hi: (hi - first) as u64,
            }
        }
    }
}

/// The most key and plane bitmaps (see [`Derived`]) a table caches, in
/// all: each holds one bit per row, so at most 32 MB at 1,000,000 rows,
/// keeping a node within its resident-memory target.
pub const DERIVED_BITMAPS: usize = 256;

/// Largest span whose per-key bitmaps are cached.
const KEYED_SPAN: u64 = 64;

/// Largest span whose bit planes are cached.
const PLANED_SPAN: u64 = 1 << 16;

/// A comparison whose test admits at most this many offsets of a keyed
/// column is the union of their key bitmaps (reading `n / 8` bytes a row)
/// rather than a scan of the one-byte codes.
const UNION_MAX: u64 = 8;

/// A grouped COUNT or SUM goes by bitmap intersection when its
/// [`bits::grouped_cost`] (word operations per 64 rows) is at most this;
/// the row-at-a-time path costs about as much as 300 of them.
const GROUPED_COST_MAX: usize = 256;

/// Bitmaps derived from one column's codes, cached so that COUNT, SUM and
/// simple comparisons become bitmap intersections and population counts.
/// Which columns may cache which bitmaps is decided when the table is made,
/// from the declared metadata only, within [`DERIVED_BITMAPS`].
#[derive(Debug, Clone, Default)]
struct Derived {
    /// Whether `keys` may be built (span at most [`KEYED_SPAN`]).
    keyed: bool,
    /// For each valid offset, in order, the rows holding it.
    keys: OnceLock<Vec<Bits>>,
    /// How many bit planes an integer column (span at most
    /// [`PLANED_SPAN`]) caches: enough for its largest valid offset.
    /// `None` for other columns.
    plane_count: Option<u32>,
    /// Plane `b` holds bit `b` of every row's offset (meaningful for
    /// present rows only), so a SUM is `Σ 2^b × |rows ∩ plane b|`.
    planes: OnceLock<Vec<Bits>>,
}

impl Derived {
    /// Which bitmaps each column may cache: in declaration order, while
    /// the budget of [`DERIVED_BITMAPS`] lasts.
    fn plan(columns: &[Column], packed: &[Packed]) -> Vec<Derived> {
        let mut budget = DERIVED_BITMAPS;
        columns
            .iter()
            .zip(packed)
            .map(|(c, p)| {
                let mut d = Derived::default();
                if p.span <= KEYED_SPAN && p.span as usize <= budget {
                    d.keyed = true;
                    budget -= p.span as usize;
                }
                // Offsets 0..span need the bits of span - 1.
                let planes = u64::BITS - p.span.saturating_sub(1).leading_zeros();
                if matches!(c, Column::Integer { .. })
                    && p.span <= PLANED_SPAN
                    && planes as usize <= budget
                {
                    d.plane_count = Some(planes);
                    budget -= planes as usize;
                }
                d
            })
            .collect()
    }
}

/// A dataset's rows, stored by compact column.
#[derive(Debug, Clone)]
pub struct Table {
    /// The declared schema the codes were encoded with.
    pub schema: Schema,
    /// One packed column per declared column, all of equal length.
    columns: Vec<Packed>,
    /// With a person-level privacy unit: the rows that count (at most
    /// `max_records` per person), computed once after the rows change.
    kept: OnceLock<Bits>,
    /// Per column, the rows where it is not missing, computed on first use
    /// and kept (1 bit per row per column used; a filtered COUNT otherwise
    /// spends half its scan recomputing them). Reset by every append.
    present: Vec<OnceLock<Bits>>,
    /// Per column, the bitmaps [`Table::derived`] caches for it (see
    /// [`Derived`]), built on first use, reset with `present`.
    derived: Vec<Derived>,
    /// Per open-domain column: the label of every code seen at ingest
    /// (shown only for keys a threshold released).
    labels: std::collections::HashMap<usize, std::collections::HashMap<u64, String>>,
}

impl Table {
    /// An empty table for `schema`.
    pub fn new(schema: Schema) -> Table {
        let columns: Vec<Packed> = schema.columns.iter().map(Packed::new).collect();
        let present = columns.iter().map(|_| OnceLock::new()).collect();
        let derived = Derived::plan(&schema.columns, &columns);
        Table {
            schema,
            columns,
            kept: OnceLock::new(),
            present,
            derived,
            labels: Default::default(),
        }
    }

    /// Sets the labels of open-domain column `column` (from the store).
    pub fn set_labels(&mut self, column: usize, labels: std::collections::HashMap<u64, String>) {
        self.labels.insert(column, labels);
    }

    /// The label of key `code` of open-domain column `column`:
    /// [`MISSING_KEY`] for the missing code; `None` if no ingest recorded
    /// one (the store is damaged).
    pub fn open_label(&self, column: usize, code: u64) -> Option<String> {
        if code == OPEN_MISSING_KEY {
            return Some(MISSING_KEY.to_string());
        }
        self.labels.get(&column)?.get(&code).cloned()
    }

    /// The stored offset of row `i` in column `c`.
    fn code_at(&self, c: usize, i: usize) -> u64 {
        with_codes!(&self.columns[c].codes, v => v[i].to_u64())
    }

    /// With a person-level privacy unit, the rows that count: for each
    /// person, the first `max_records` of their records ordered by the
    /// other columns' stored codes in declaration order (categoricals by
    /// domain order, integers ascending, booleans 0 first, missing last).
    /// The choice depends only on the person's own records, never on
    /// storage order or on other persons, so adding or removing one person
    /// changes only that person's kept records (at most `max_records`).
    /// `None` when the unit is one record.
    pub(crate) fn kept_rows(&self) -> Option<&Bits> {
        let unit = self.schema.person?;
        Some(self.kept.get_or_init(|| {
            let n = self.len();
            let person = |i: usize| self.code_at(unit.column, i);
            let mut order: Vec<u32> = (0..n as u32).collect();
            order.sort_unstable_by_key(|&i| person(i as usize));
            let others: Vec<usize> = (0..self.columns.len())
                .filter(|&c| c != unit.column)
                .collect();
            let mut bits = vec![0u64; n.div_ceil(64)];
            let k = unit.max_records as usize;
            let mut start = 0;
            while start < n {
                let p = person(order[start] as usize);
                let mut end = start + 1;
                while end < n && person(order[end] as usize) == p {
                    end += 1;
                }
                let group = &mut order[start..end];
                if group.len() > k {
                    group.sort_unstable_by(|&a, &b| {
                        others
                            .iter()
                            .map(|&c| {
                                self.code_at(c, a as usize)
                                    .cmp(&self.code_at(c, b as usize))
                            })
                            .find(|o| o.is_ne())
                            .unwrap_or(std::cmp::Ordering::Equal)
                    });
                }
                for &i in group.iter().take(k) {
                    bits[i as usize / 64] |= 1 << (i % 64);
                }
                start = end;
            }
            bits
        }))
    }

    /// Appends rows given in row-major order (`schema.columns.len()` codes
    /// a row), as `fedq_node::ingest` encodes them.
    ///
    /// # Panics
    /// If a code lies outside its column's declared domain or bounds:
    /// ingest never produces one, and the store is loaded through
    /// [`Table::append_chunk`], which reports damage as an error instead.
    pub fn append_row_major(&mut self, codes: &[i64]) {
        let width = self.columns.len();
        self.forget_derived();
        for col in &mut self.columns {
            col.reserve(codes.len() / width);
        }
        self.kept = OnceLock::new();
        for row in codes.chunks_exact(width) {
            for (i, (col, &v)) in self.columns.iter_mut().zip(row).enumerate() {
                let offset = col.offset(v).unwrap_or_else(|| {
                    panic!("code {v} is outside the declared domain or bounds of column {i}")
                });
                col.push(offset);
            }
        }
    }

    /// Appends one stored chunk (see [`encode_chunk`]), checking its shape
    /// and that every value is a valid offset or the missing code; on error
    /// the table is left unusable and must be dropped.
    pub fn append_chunk(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.kept = OnceLock::new();
        let (head, mut rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("a stored chunk is truncated")?;
        let rows = u32::from_le_bytes(*head) as usize;
        self.forget_derived();
        for col in &mut self.columns {
            let (&width, body) = rest.split_first().ok_or("a stored chunk is truncated")?;
            if usize::from(width) != col.width() {
                return Err(format!(
                    "a stored chunk packs a column in {width} bytes, the schema needs {}",
                    col.width()
                ));
            }
            let n = rows * col.width();
            if body.len() < n {
                return Err("a stored chunk is truncated".into());
            }
            col.extend_le(&body[..n])?;
            rest = &body[n..];
        }
        if !rest.is_empty() {
            return Err("a stored chunk has trailing bytes".into());
        }
        Ok(())
    }

    /// Drops the cached present-rows, key and plane bitmaps (the rows
    /// are changing).
    fn forget_derived(&mut self) {
        for p in &mut self.present {
            p.take();
        }
        for d in &mut self.derived {
            d.keys.take();
            d.planes.take();
        }
    }

    /// Number of rows. Internal only: never released without noise.
    pub(crate) fn len(&self) -> usize {
        self.columns.first().map_or(0, Packed::len)
    }

    /// Checks that the table holds `expected` rows (the count the store
    /// recorded with its chunks), without handing the count out.
    pub fn has_rows(&self, expected: u64) -> bool {
        self.len() as u64 == expected
    }

    /// Chooses, now rather than at the first query, the records that count
    /// for each person (a dataset whose unit is a person); nothing for a
    /// record unit.
    pub fn prepare(&self) {
        self.kept_rows();
    }

    /// Approximate heap bytes held by the columns (for capacity planning).
    pub fn heap_bytes(&self) -> usize {
        self.columns.iter().map(|c| c.len() * c.width()).sum()
    }

    /// Heap bytes of the bitmaps cached so far (present rows, kept rows,
    /// key and plane bitmaps), for capacity planning: at most
    /// [`DERIVED_BITMAPS`] key and plane bitmaps plus one present bitmap
    /// per column and the kept rows, each of one bit per row.
    pub fn cached_bytes(&self) -> usize {
        let size = |b: &Bits| b.len() * 8;
        let many = |v: Option<&Vec<Bits>>| v.map_or(0, |v| v.iter().map(size).sum());
        self.present
            .iter()
            .filter_map(OnceLock::get)
            .map(size)
            .chain(self.kept.get().map(size))
            .chain(
                self.derived
                    .iter()
                    .map(|d| many(d.keys.get()) + many(d.planes.get())),
            )
            .sum()
    }

    /// Computes the exact value of every measurement of `plan`, one vector
    /// per measurement with one value per cell (in cell order, see
    /// [`fedq_plan::plan::cell_keys`]). Sums clamp each value to the
    /// measurement's bounds. Opaque: only a mechanism can read them.
    pub fn exact(&self, plan: &Plan) -> Vec<Exact> {
        self.exact_values(plan)
            .into_iter()
            .map(Exact::new)
            .collect()
    }

    /// The values of [`Table::exact`], readable: for this crate only.
    pub(crate) fn exact_values(&self, plan: &Plan) -> Vec<Vec<i64>> {
        let selected = self.selected(plan);
        let keys = self.group_keys(plan);
        let cells = std::cell::OnceCell::new();
        let cells = || {
            cells
                .get_or_init(|| self.cells(plan).unwrap_or_default())
                .as_slice()
        };
        let count = cell_count(plan);
        plan.measurements
            .iter()
            .map(|m| {
                let mut out = vec![0i64; count * m.values_per_cell()];
                match m {
                    MeasurementSpec::CountRows => match &keys {
                        Some(keys) => grouped_count(&selected, keys, &mut out),
                        None => count_bits(&selected, cells(), &mut out),
                    },
                    MeasurementSpec::CountWhere { condition, .. } => {
                        let bits = and(&selected, &self.rows_where(condition, true));
                        match &keys {
                            Some(keys) => grouped_count(&bits, keys, &mut out),
                            None => count_bits(&bits, cells(), &mut out),
                        }
                    }
                    MeasurementSpec::CountPresent { column } => {
                        let bits = and(&selected, self.present(*column));
                        match &keys {
                            Some(keys) => grouped_count(&bits, keys, &mut out),
                            None => count_bits(&bits, cells(), &mut out),
                        }
                    }
                    MeasurementSpec::Sum { column, min, max } => {
                        let bits = and(&selected, self.present(*column));
                        let p = &self.columns[*column];
                        // Every stored value already lies within the bounds
                        // (the clamp is a no-op).
                        let unclamped = *min <= p.base
                            && p.span > 0
                            && p.base.saturating_add(p.span as i64 - 1) <= *max;
                        if unclamped && self.sum_by_planes(&bits, keys.as_deref(), *column, &mut out) {
                            return out;
                        }
                        // One byte per value sums eight at a time.
                        if let (Codes::U8(v), true, true) =
                            (&p.codes, plan.group_by.is_empty(), unclamped)
                        {
                            out[0] = sum_u8(&bits, v, p.base);
                            return out;
                        }
                        let cells = (!plan.group_by.is_empty()).then(cells);
                        with_codes!(&p.codes, v => sum_bits(
                            &bits,
                            cells,
                            v,
                            p.base,
                            (*min, *max),
                            &mut out,
                        ));
                    }
                    MeasurementSpec::Histogram {
                        column,
                        min,
                        max,
                        bins,
                    } => {
                        let bits = and(&selected, self.present(*column));
                        let p = &self.columns[*column];
                        let k = *bins as usize;
                        let cells = (!plan.group_by.is_empty()).then(cells);
                        with_codes!(&p.codes, v => for_each_bit(&bits, |i| {
                            let value = p.base + v[i].to_u64() as i64;
                            let cell = cells.map_or(0, |c| c[i] as usize);
                            out[cell * k + fedq_dp::distribution::bin_of(value, *min, *max, *bins)] += 1;
                        }));
                    }
                    MeasurementSpec::SumOf { expr, .. } | MeasurementSpec::CountOf { expr, .. } => {
                        // Row at a time over the columns the expression reads.
                        let columns = expr.columns();
                        let values: Vec<Vec<i64>> =
                            columns.iter().map(|&c| self.values(c)).collect();
                        let cells = (!plan.group_by.is_empty()).then(cells);
                        let bounds = match m {
                            MeasurementSpec::SumOf { min, max, .. } => Some((*min, *max)),
                            _ => None,
                        };
                        for_each_bit(&selected, |i| {
                            let value = |c: usize| {
                                let k = columns.iter().position(|&x| x == c)?;
                                Some(values[k][i]).filter(|&v| v != MISSING)
                            };
                            let Some(v) = expr.eval(&value) else { return };
                            let cell = cells.map_or(0, |c| c[i] as usize);
                            out[cell] = out[cell].saturating_add(match bounds {
                                // Within ±2^40 once clamped: fits.
                                Some((lo, hi)) => v.clamp(lo.into(), hi.into()) as i64,
                                None => 1,
                            });
                        });
                    }
                    MeasurementSpec::SumSquares {
                        column,
                        center,
                        min,
                        max,
                    } => {
                        let bits = and(&selected, self.present(*column));
                        let p = &self.columns[*column];
                        let cells = (!plan.group_by.is_empty()).then(cells);
                        with_codes!(&p.codes, v => for_each_bit(&bits, |i| {
                            let d = (p.base + v[i].to_u64() as i64).clamp(*min, *max) - center;
                            let cell = cells.map_or(0, |c| c[i] as usize);
                            out[cell] = out[cell].saturating_add(d.saturating_mul(d));
                        }));
                    }
                }
                out
            })
            .collect()
    }

    /// For a GROUP BY over one open-domain column: the exact count of rows
    /// per key present among the selected rows (keys are the stored codes,
    /// the missing code being [`OPEN_MISSING_KEY`]). A key with no selected
    /// row is absent, as the threshold mechanism expects.
    /// Opaque: only the threshold mechanism can read them.
    pub fn open_counts(&self, plan: &Plan) -> ExactKeyCounts {
        ExactKeyCounts::new(self.open_counts_values(plan))
    }

    /// The counts of [`Table::open_counts`], readable: for this crate only.
    pub(crate) fn open_counts_values(&self, plan: &Plan) -> std::collections::HashMap<u64, i64> {
        let mut counts = std::collections::HashMap::new();
        let Some(column) = plan.open_key else {
            return counts;
        };
        let selected = self.selected(plan);
        let p = &self.columns[column];
        with_codes!(&p.codes, v => for_each_bit(&selected, |i| {
            *counts.entry(v[i].to_u64()).or_insert(0i64) += 1;
        }));
        counts
    }

    /// The rows `plan` aggregates: those its WHERE clause makes TRUE,
    /// among the records that count for their person (if the unit is one).
    fn selected(&self, plan: &Plan) -> Cow<'_, [u64]> {
        let selected = match &plan.filter {
            Some(p) => self.rows_where(p, true),
            None => Cow::Owned(all_rows(self.len())),
        };
        match self.kept_rows() {
            Some(kept) => and_cow(selected, Cow::Borrowed(kept)),
            None => selected,
        }
    }

    /// With GROUP BY, the bitmaps of every group column if all are keyed
    /// and counting cells by intersection is cheap enough (see
    /// [`GROUPED_COST_MAX`]); without, no bitmap (one cell). `None`: count
    /// row at a time through [`Table::cells`].
    fn group_keys(&self, plan: &Plan) -> Option<Vec<KeyBits<'_>>> {
        // A CASE bucket has no stored key bitmaps: row at a time.
        if !plan.buckets.is_empty() {
            return None;
        }
        let sizes: Vec<usize> = plan.group_sizes.iter().map(|s| s + 1).collect();
        if bits::grouped_cost(&sizes, 0) > GROUPED_COST_MAX {
            return None;
        }
        plan.group_by
            .iter()
            .map(|&c| {
                Some(KeyBits {
                    eq: self.keys(c)?,
                    present: self.present(c),
                })
            })
            .collect()
    }

    /// SUM of `column` (known to need no clamping) over `rows` (all
    /// present) per cell, by bit planes: `base × count + Σ 2^b × count in
    /// plane b`. Returns false, leaving `out` alone, if the column has no
    /// planes, the cells are not keyed or too many, or a running sum could
    /// overflow (the row-at-a-time path saturates; here every partial sum
    /// provably fits, so the result is the same exact sum).
    fn sum_by_planes(
        &self,
        rows: &[u64],
        keys: Option<&[KeyBits<'_>]>,
        column: usize,
        out: &mut [i64],
    ) -> bool {
        let p = &self.columns[column];
        let (Some(keys), Some(count)) = (keys, self.derived[column].plane_count) else {
            return false;
        };
        let sizes: Vec<usize> = keys.iter().map(|k| k.eq.len() + 1).collect();
        let largest = i128::from(p.base)
            .abs()
            .max((i128::from(p.base) + i128::from(p.span) - 1).abs());
        if bits::grouped_cost(&sizes, count as usize) > GROUPED_COST_MAX
            || largest * self.len() as i128 > i128::from(i64::MAX)
        {
            return false;
        }
        let planes: Vec<&[u64]> = self.planes(column).iter().map(Vec::as_slice).collect();
        let stride = 1 + planes.len();
        let mut tally = vec![0u64; out.len() * stride];
        bits::grouped_counts(rows, keys, &planes, &mut tally);
        for (o, t) in out.iter_mut().zip(tally.chunks_exact(stride)) {
            let weighted: i128 = t[1..]
                .iter()
                .enumerate()
                .map(|(b, &n)| i128::from(n) << b)
                .sum();
            // Fits: |sum| <= largest × rows <= i64::MAX (checked above).
            *o = (i128::from(p.base) * i128::from(t[0]) + weighted) as i64;
        }
        true
    }

    /// Exposes [`Table::exact`] to the criterion benches (feature
    /// `bench-internals`, never enabled in the node binary).
    #[cfg(feature = "bench-internals")]
    #[doc(hidden)]
    pub fn exact_for_bench(&self, plan: &Plan) -> Vec<Vec<i64>> {
        self.exact_values(plan)
    }

    /// The dense cell index of every row, or `None` without GROUP BY.
    /// Mixed radix over the group columns, first column most significant;
    /// each column's key is its stored offset (its missing code is its
    /// last key).
    fn cells(&self, plan: &Plan) -> Option<Vec<u32>> {
        let (&first, rest) = plan.group_by.split_first()?;
        let mut cells: Vec<u32> = match plan.bucket(first) {
            Some(b) => self.bucket_codes(b),
            None => {
                with_codes!(&self.columns[first].codes, v => v.iter().map(|&c| c.to_u64() as u32).collect())
            }
        };
        for (&col, &size) in rest.iter().zip(&plan.group_sizes[1..]) {
            match plan.bucket(col) {
                Some(b) => add_key(&mut cells, &self.bucket_codes(b), size as u32 + 1),
                None => {
                    with_codes!(&self.columns[col].codes, v => add_key(&mut cells, v, size as u32 + 1))
                }
            }
        }
        Some(cells)
    }

    /// Every row's key in a per-row key: in a CASE bucket, the label of
    /// the first branch whose condition is TRUE for it, else the ELSE
    /// label; in a number key, the key of its value
    /// ([`fedq_plan::plan::NumberKey::key`]); else missing (the bucket's
    /// last key).
    fn bucket_codes(&self, b: &Bucket) -> Vec<u32> {
        let n = self.len();
        let missing = b.labels.len() as u32;
        let (branches, otherwise) = match &b.rule {
            KeyRule::Case {
                branches,
                otherwise,
            } => (branches, otherwise),
            KeyRule::Number(k) => {
                // Row at a time over the columns the expression reads.
                let columns = k.expr.columns();
                let values: Vec<Vec<i64>> = columns.iter().map(|&c| self.values(c)).collect();
                return (0..n)
                    .map(|i| {
                        let value = |c: usize| {
                            let at = columns.iter().position(|&x| x == c)?;
                            Some(values[at][i]).filter(|&v| v != MISSING)
                        };
                        k.expr.eval(&value).map_or(missing, |v| k.key(v) as u32)
                    })
                    .collect();
            }
        };
        let mut codes = vec![otherwise.map_or(missing, |o| o as u32); n];
        // Later branches first, so that earlier ones take precedence.
        for (p, label) in branches.iter().rev() {
            let rows = self.rows_where(p, true);
            for (w, &word) in rows.iter().enumerate() {
                let mut x = word;
                while x != 0 {
                    let row = w * 64 + x.trailing_zeros() as usize;
                    if row < n {
                        codes[row] = *label as u32;
                    }
                    x &= x - 1;
                }
            }
        }
        codes
    }

    /// Every row's value code in `column` (the schema's code: a category's
    /// index, an integer's value, 0 or 1, an open column's hash), or
    /// [`MISSING`].
    fn values(&self, column: usize) -> Vec<i64> {
        let p = &self.columns[column];
        with_codes!(&p.codes, v => v
            .iter()
            .map(|&c| {
                let o = c.to_u64();
                if o == p.span {
                    MISSING
                } else {
                    p.base + o as i64
                }
            })
            .collect())
    }

    /// Rows where `column` is not missing (cached).
    fn present(&self, column: usize) -> &Bits {
        self.present[column].get_or_init(|| {
            let p = &self.columns[column];
            with_codes!(&p.codes, v => present_bits(v, p.span))
        })
    }

    /// Column `column`'s key bitmaps (cached), if it may cache them.
    fn keys(&self, column: usize) -> Option<&[Bits]> {
        let d = &self.derived[column];
        d.keyed.then(|| {
            d.keys
                .get_or_init(|| {
                    let p = &self.columns[column];
                    with_codes!(&p.codes, v => key_bits(v, p.span as usize))
                })
                .as_slice()
        })
    }

    /// Column `column`'s bit planes (cached); empty unless
    /// `plane_count` is set.
    fn planes(&self, column: usize) -> &[Bits] {
        let d = &self.derived[column];
        d.planes.get_or_init(|| {
            let p = &self.columns[column];
            (0..d.plane_count.unwrap_or(0))
                .map(|b| with_codes!(&p.codes, v => pack_bits(v, |c| (c.to_u64() >> b) & 1 == 1)))
                .collect()
        })
    }

    /// The rows where predicate `p` is TRUE (`side`) or FALSE (`!side`);
    /// the rest are UNKNOWN. In SQL's three-valued (Kleene) logic, either
    /// side of AND and OR follows from the same side of their operands and
    /// NOT swaps the sides, so only the side asked for is ever computed.
    fn rows_where(&self, p: &Predicate, side: bool) -> Cow<'_, [u64]> {
        match p {
            Predicate::And(a, b) | Predicate::Or(a, b) => {
                let (x, y) = (self.rows_where(a, side), self.rows_where(b, side));
                // TRUE of AND and FALSE of OR need both operands.
                if matches!(p, Predicate::And(..)) == side {
                    and_cow(x, y)
                } else {
                    or_cow(x, y)
                }
            }
            Predicate::Not(a) => self.rows_where(a, !side),
            Predicate::Cmp { column, op, value } => {
                let c = &self.columns[*column];
                let v = i128::from(*value);
                let (test, negated) = match op {
                    CmpOp::Eq => (Test::range(c, v, v), false),
                    CmpOp::Ne => (Test::range(c, v, v), true),
                    CmpOp::Lt => (Test::range(c, i128::MIN, v - 1), false),
                    CmpOp::Le => (Test::range(c, i128::MIN, v), false),
                    CmpOp::Gt => (Test::range(c, v + 1, i128::MAX), false),
                    CmpOp::Ge => (Test::range(c, v, i128::MAX), false),
                };
                self.leaf(*column, &test, side != negated)
            }
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => {
                let test = Test::range(&self.columns[*column], (*low).into(), (*high).into());
                self.leaf(*column, &test, side != *negated)
            }
            Predicate::In {
                column,
                values,
                negated,
            } => {
                let c = &self.columns[*column];
                let mut set: Vec<u64> = values
                    .iter()
                    .filter(|&&v| v != MISSING)
                    .filter_map(|&v| c.offset(v))
                    .collect();
                set.sort_unstable();
                set.dedup();
                let test = match set.as_slice() {
                    [] => Test::Never,
                    &[x] => Test::Range { lo: x, hi: x },
                    _ => Test::Set(set),
                };
                self.leaf(*column, &test, side != *negated)
            }
            Predicate::Columns {
                left,
                op,
                right,
                relabel,
            } => {
                // Row at a time: TRUE (or FALSE) needs both values present.
                let (a, b) = (self.values(*left), self.values(*right));
                let outcome: Vec<u8> = a
                    .iter()
                    .zip(&b)
                    .map(|(&x, &y)| {
                        if x == MISSING || y == MISSING {
                            return 0;
                        }
                        let x = match relabel {
                            Some(m) => usize::try_from(x)
                                .ok()
                                .and_then(|i| m.get(i))
                                .copied()
                                .unwrap_or(-1),
                            None => x,
                        };
                        u8::from(op.holds(x, y) == side)
                    })
                    .collect();
                Cow::Owned(pack_bits(&outcome, |t| t == 1))
            }
            Predicate::IsMissing { column, negated } => {
                let present = self.present(*column);
                if side == *negated {
                    Cow::Borrowed(present)
                } else {
                    Cow::Owned(not(present, self.len()))
                }
            }
        }
    }

    /// The rows of `column` that pass `test` (`hit`) or that fail it
    /// (`!hit`); missing values do neither.
    fn leaf(&self, column: usize, test: &Test, hit: bool) -> Cow<'_, [u64]> {
        let hits = self.hits(column, test);
        if hit {
            hits
        } else {
            // Every hit is present (tests only admit valid offsets).
            Cow::Owned(and_not(self.present(column), &hits))
        }
    }

    /// The rows of `column` that pass `test`: a union of at most
    /// [`UNION_MAX`] cached key bitmaps (borrowed if one), else for a
    /// range a bit-sliced comparison over the cached planes, else a scan
    /// of the codes.
    fn hits(&self, column: usize, test: &Test) -> Cow<'_, [u64]> {
        let p = &self.columns[column];
        let admitted = match test {
            Test::Never => return Cow::Owned(vec![0; self.len().div_ceil(64)]),
            Test::Range { lo, hi } => hi - lo + 1,
            Test::Set(set) => set.len() as u64,
        };
        if admitted <= UNION_MAX {
            if let Some(keys) = self.keys(column) {
                return match test {
                    Test::Range { lo, hi } => union(keys, *lo..=*hi),
                    Test::Set(set) => union(keys, set.iter().copied()),
                    Test::Never => unreachable!("handled above"),
                };
            }
        }
        if let (Test::Range { lo, hi }, Some(count)) = (test, self.derived[column].plane_count) {
            // Present rows hold offsets up to `span - 1`: a range up to it
            // is one-sided.
            let hi = if *hi + 1 == p.span {
                (1 << count) - 1
            } else {
                *hi
            };
            let planes = self.planes(column);
            return Cow::Owned(bits::planes_in_range(planes, self.present(column), *lo, hi));
        }
        Cow::Owned(match test {
            Test::Never => unreachable!("handled above"),
            Test::Range { lo, hi } => with_codes!(&p.codes, v => range_bits(v, *lo, *hi)),
            Test::Set(set) if p.span <= 1 << 16 => {
                let mut member = vec![false; p.span as usize + 1];
                for &o in set {
                    member[o as usize] = true;
                }
                with_codes!(&p.codes, v => pack_bits(v, |c| member[c.to_u64() as usize]))
            }
            Test::Set(set) => {
                with_codes!(&p.codes, v => pack_bits(v, |c| set.binary_search(&c.to_u64()).is_ok()))
            }
        })
    }
}

/// Encodes row-major codes (as `fedq_node::ingest` produces them) into one
/// stored chunk: the row count (`u32` LE), then each column in declaration
/// order as its packing width (one byte: 1, 2, 4 or 8) followed by every
/// row's offset, little-endian, in that width. A chunk is the in-memory
/// packing written out, so loading one is a copy.
///
/// Fails, naming the column, if a code lies outside its declared domain or
/// bounds (ingest validates every cell, so this means a bug upstream).
pub fn encode_chunk(schema: &Schema, codes: &[i64]) -> Result<Vec<u8>, String> {
    let width = schema.columns.len();
    let rows = codes.len() / width;
    let row_count = u32::try_from(rows).map_err(|_| "a chunk holds at most 2^32 - 1 rows")?;
    let packs: Vec<Packed> = schema.columns.iter().map(Packed::new).collect();
    let bytes: usize = packs.iter().map(|p| 1 + rows * p.width()).sum();
    let mut out = Vec::with_capacity(4 + bytes);
    out.extend_from_slice(&row_count.to_le_bytes());
    for (c, p) in packs.iter().enumerate() {
        out.push(p.width() as u8);
        let column = codes[..rows * width].iter().skip(c).step_by(width);
        with_codes!(&p.codes, v => write_column(v, column, p, &mut out)).map_err(|v| {
            format!(
                "code {v} is outside the declared domain or bounds of column {:?}",
                schema.columns[c].name()
            )
        })?;
    }
    Ok(out)
}

/// Decodes one stored chunk (see [`encode_chunk`]) into row-major codes
/// under `schema`: the encoder's inverse, by the same layout (each
/// column's offsets from its base, its span meaning missing). Fails on a
/// chunk that is truncated, has trailing bytes, a width that is not 1, 2,
/// 4 or 8, or an offset past the span.
pub fn decode_chunk(schema: &Schema, bytes: &[u8]) -> Result<Vec<i64>, String> {
    let truncated = || "a stored chunk is truncated".to_string();
    let (head, mut rest) = bytes.split_first_chunk::<4>().ok_or_else(truncated)?;
    let rows = u32::from_le_bytes(*head) as usize;
    let width = schema.columns.len();
    let mut codes = vec![MISSING; rows * width];
    for (c, column) in schema.columns.iter().enumerate() {
        let (base, span) = layout(column);
        let (&w, body) = rest.split_first().ok_or_else(truncated)?;
        let w = usize::from(w);
        if !matches!(w, 1 | 2 | 4 | 8) {
            return Err(format!("a stored chunk packs a column in {w} bytes"));
        }
        let n = rows * w;
        let values = body.get(..n).ok_or_else(truncated)?;
        for (row, v) in values.chunks_exact(w).enumerate() {
            let mut le = [0u8; 8];
            le[..w].copy_from_slice(v);
            let offset = u64::from_le_bytes(le);
            codes[row * width + c] = match offset.cmp(&span) {
                std::cmp::Ordering::Less => base + offset as i64,
                std::cmp::Ordering::Equal => MISSING,
                std::cmp::Ordering::Greater => {
                    return Err(format!(
                        "a stored value of column {:?} lies outside its declared domain or bounds",
                        column.name()
                    ))
                }
            };
        }
        rest = &body[n..];
    }
    if !rest.is_empty() {
        return Err("a stored chunk has trailing bytes".into());
    }
    Ok(codes)
}

/// Writes the offsets of `values` in `T`'s width (the `&[T]` only picks
/// the width).
fn write_column<'a, T: Code>(
    _width: &[T],
    values: impl Iterator<Item = &'a i64>,
    p: &Packed,
    out: &mut Vec<u8>,
) -> Result<(), i64> {
    for &v in values {
        T::from_u64(p.offset(v).ok_or(v)?).write_le(out);
    }
    Ok(())
}

/// One bit per value of `v`: whether `test` holds.
///
/// Written for the vectoriser: 64 tests at a time into a byte mask (one
/// compare per lane), then each 8 mask bytes (0 or 1) folded into 8 bits
/// with one multiplication: byte `i` is moved to bit `56 + i` by the term
/// `2^(56 - 7i)` of the magic, and every other partial product lands on a
/// distinct bit below 56, so nothing carries into the result.
#[inline(always)]
fn pack_bits<T: Code>(v: &[T], test: impl Fn(T) -> bool) -> Bits {
    const GATHER: u64 = 0x0102_0408_1020_4080;
    let mut out = Vec::with_capacity(v.len().div_ceil(64));
    let mut chunks = v.chunks_exact(64);
    let mut mask = [0u8; 64];
    for chunk in &mut chunks {
        for (m, &c) in mask.iter_mut().zip(chunk) {
            *m = u8::from(test(c));
        }
        let mut w = 0u64;
        for (k, bytes) in mask.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(bytes);
            w |= (u64::from_le_bytes(b).wrapping_mul(GATHER) >> 56) << (8 * k);
        }
        out.push(w);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = 0u64;
        for (i, &c) in rest.iter().enumerate() {
            w |= u64::from(test(c)) << i;
        }
        out.push(w);
    }
    out
}

/// One bit per value: whether it is not the missing code `span`
/// (compared in the column's own width, so a lane holds as many values
/// as possible).
fn present_bits<T: Code>(v: &[T], span: u64) -> Bits {
    let missing = T::from_u64(span);
    pack_bits(v, |c| c != missing)
}

/// One bit per value: whether it lies in `lo..=hi`, with one unsigned
/// comparison (values below `lo` wrap around to large ones).
fn range_bits<T: Code>(v: &[T], lo: u64, hi: u64) -> Bits {
    let width = T::from_u64(hi - lo);
    let lo = T::from_u64(lo);
    pack_bits(v, |c| c.wrapping_sub(lo) <= width)
}

/// Every one of `rows` rows.
fn all_rows(rows: usize) -> Bits {
    let mut out = vec![u64::MAX; rows / 64];
    if !rows.is_multiple_of(64) {
        out.push((1u64 << (rows % 64)) - 1);
    }
    out
}

fn and(a: &[u64], b: &[u64]) -> Bits {
    a.iter().zip(b).map(|(x, y)| x & y).collect()
}

fn and_not(a: &[u64], b: &[u64]) -> Bits {
    a.iter().zip(b).map(|(x, y)| x & !y).collect()
}

/// The rows of `rows` not in `a`.
fn not(a: &[u64], rows: usize) -> Bits {
    and_not(&all_rows(rows), a)
}

/// `a ∧ b` (row-wise AND), reusing an owned operand's buffer.
fn and_cow<'a>(a: Cow<'a, [u64]>, b: Cow<'a, [u64]>) -> Cow<'a, [u64]> {
    combine(a, b, |x, y| x & y)
}

/// `a ∨ b` (row-wise OR), reusing an owned operand's buffer.
fn or_cow<'a>(a: Cow<'a, [u64]>, b: Cow<'a, [u64]>) -> Cow<'a, [u64]> {
    combine(a, b, |x, y| x | y)
}

/// A commutative word operation over two bitmaps, in place when one is
/// owned.
fn combine<'a>(
    a: Cow<'a, [u64]>,
    b: Cow<'a, [u64]>,
    op: impl Fn(u64, u64) -> u64,
) -> Cow<'a, [u64]> {
    let (mut out, other) = match (a, b) {
        (Cow::Owned(v), o) | (o, Cow::Owned(v)) => (v, o),
        (Cow::Borrowed(x), Cow::Borrowed(y)) => {
            return Cow::Owned(x.iter().zip(y).map(|(x, y)| op(*x, *y)).collect())
        }
    };
    for (w, o) in out.iter_mut().zip(other.iter()) {
        *w = op(*w, *o);
    }
    Cow::Owned(out)
}

/// The union of the key bitmaps of `offsets` (at least one), borrowed
/// when there is only one.
fn union<'a>(keys: &'a [Bits], offsets: impl IntoIterator<Item = u64>) -> Cow<'a, [u64]> {
    let mut bitmaps = offsets.into_iter().map(|o| keys[o as usize].as_slice());
    let first = bitmaps.next().unwrap_or_default();
    bitmaps.fold(Cow::Borrowed(first), |acc, b| or_cow(acc, Cow::Borrowed(b)))
}

/// For each valid offset `0..span` of `v`, the rows holding it: one pass,
/// each 64 rows scattered into one word per offset (`span` is the missing
/// code, dropped).
fn key_bits<T: Code>(v: &[T], span: usize) -> Vec<Bits> {
    let words = v.len().div_ceil(64);
    let mut out: Vec<Bits> = (0..span).map(|_| Vec::with_capacity(words)).collect();
    let mut acc = vec![0u64; span + 1];
    for chunk in v.chunks(64) {
        for (j, &c) in chunk.iter().enumerate() {
            acc[c.to_u64() as usize] |= 1 << j;
        }
        for (o, a) in out.iter_mut().zip(&mut acc) {
            o.push(*a);
            *a = 0;
        }
        acc[span] = 0;
    }
    out
}

/// Grouped COUNT of the rows of `rows` by bitmap intersection (see
/// [`bits::grouped_counts`]).
fn grouped_count(rows: &[u64], keys: &[KeyBits<'_>], out: &mut [i64]) {
    let mut tally = vec![0u64; out.len()];
    bits::grouped_counts(rows, keys, &[], &mut tally);
    for (o, t) in out.iter_mut().zip(tally) {
        *o = t as i64;
    }
}

/// Calls `f` with the index of every set bit, in order.
#[inline(always)]
fn for_each_bit(bits: &[u64], mut f: impl FnMut(usize)) {
    for (wi, &w) in bits.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            f(wi * 64 + w.trailing_zeros() as usize);
            w &= w - 1;
        }
    }
}

/// Adds one to the cell of every row in `bits`.
///
/// Grouped counts go to four interleaved tallies per cell, used in turn, so
/// that consecutive rows of the same cell do not wait on each other's
/// increment (most rows fall in a few cells).
fn count_bits(bits: &[u64], cells: &[u32], out: &mut [i64]) {
    let mut tally = vec![[0i64; 4]; out.len()];
    for (wi, &w) in bits.iter().enumerate() {
        let cells = &cells[wi * 64..];
        let mut w = w;
        let mut lane = 0;
        while w != 0 {
            tally[cells[w.trailing_zeros() as usize] as usize][lane & 3] += 1;
            lane += 1;
            w &= w - 1;
        }
    }
    for (o, t) in out.iter_mut().zip(&tally) {
        *o = t.iter().sum();
    }
}

/// Adds the value (clamped to `bounds`) of every row in `bits` to its cell.
fn sum_bits<T: Code>(
    bits: &[u64],
    cells: Option<&[u32]>,
    codes: &[T],
    base: i64,
    (min, max): (i64, i64),
    out: &mut [i64],
) {
    let value = |i: usize| (base + codes[i].to_u64() as i64).clamp(min, max);
    match cells {
        // Branch-free over each 64-row word: every value masked by its
        // bit (the compiler vectorises this; visiting set bits one by one
        // cannot be). A word's 64 values (each within ±2^40) cannot
        // overflow; words are added with saturation.
        None => {
            let mut total = 0i64;
            for (word, chunk) in bits.iter().zip(codes.chunks(64)) {
                if *word == 0 {
                    continue;
                }
                let s: i64 = chunk
                    .iter()
                    .enumerate()
                    .map(|(j, c)| {
                        let v = (base + c.to_u64() as i64).clamp(min, max);
                        v & -(((word >> j) & 1) as i64)
                    })
                    .sum();
                total = total.saturating_add(s);
            }
            out[0] = total;
        }
        Some(cells) => for_each_bit(bits, |i| {
            let c = &mut out[cells[i] as usize];
            *c = c.saturating_add(value(i));
        }),
    }
}

/// For each byte `b`, eight bytes each `0xFF` where the matching bit of
/// `b` is set (bit `k` → byte `k`, little-endian).
const SPREAD: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 8 {
            if b & (1 << k) != 0 {
                t[b] |= 0xFF << (8 * k);
            }
            k += 1;
        }
        b += 1;
    }
    t
};

/// `base × (rows in bits) + the sum of the one-byte codes of those rows`,
/// eight rows at a time (SWAR): the codes of 8 rows are masked by their
/// bits as one `u64`, then added as four 16-bit lanes (at most 8 × 510 per
/// word of 64 rows, so no lane overflows) and folded once per word.
fn sum_u8(bits: &[u64], codes: &[u8], base: i64) -> i64 {
    const EVEN: u64 = 0x00FF_00FF_00FF_00FF;
    let mut total: i64 = 0;
    let mut rows: i64 = 0;
    let full = codes.chunks_exact(64);
    let tail = full.remainder();
    for (&word, chunk) in bits.iter().zip(full) {
        if word == 0 {
            continue;
        }
        rows += i64::from(word.count_ones());
        let mut lanes = 0u64;
        for (k, eight) in chunk.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(eight);
            let x = u64::from_le_bytes(b) & SPREAD[((word >> (8 * k)) & 0xFF) as usize];
            lanes += (x & EVEN) + ((x >> 8) & EVEN);
        }
        // Sum of the four 16-bit lanes, in the top lane.
        total += (lanes.wrapping_mul(0x0001_0001_0001_0001) >> 48) as i64;
    }
    // The last, partial word (bits past the last row are 0).
    if let Some(&word) = bits.get(codes.len() / 64) {
        for (j, &c) in tail.iter().enumerate() {
            if word >> j & 1 == 1 {
                rows += 1;
                total += i64::from(c);
            }
        }
    }
    total.saturating_add(base.saturating_mul(rows))
}

/// `cell = cell * radix + key` for every row (one vectorisable pass).
fn add_key<T: Code>(cells: &mut [u32], keys: &[T], radix: u32) {
    for (cell, &k) in cells.iter_mut().zip(keys) {
        *cell = *cell * radix + k.to_u64() as u32;
    }
}

/// The stored code of a missing value in an open-domain column (its
/// packing's missing code), as a key of [`Table::open_counts`].
pub const OPEN_MISSING_KEY: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;
    use fedq_plan::plan::{cell_keys, plan, RowExpr};
    use fedq_plan::schema::{ColumnSpec, ColumnType};

    fn table() -> Table {
        let schema = Schema::from_specs(
            "t",
            &[
                ColumnSpec {
                    open: None,
                    name: "g".into(),
                    kind: ColumnType::Categorical,
                    domain: Some(vec!["a".into(), "b".into()]),
                    min: None,
                    max: None,
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "f".into(),
                    kind: ColumnType::Boolean,
                    domain: None,
                    min: None,
                    max: None,
                    bins: None,
                },
                ColumnSpec {
                    open: None,
                    name: "m".into(),
                    kind: ColumnType::Integer,
                    domain: None,
                    min: Some(0),
                    max: Some(10),
                    bins: None,
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

    /// A per-row number's keys: each value of its derived bounds, or
    /// `BIN` ranges read off `bin_edges`; a missing value is (missing).
    #[test]
    fn number_keys_count_each_row_in_its_value_or_range() {
        let t = table();
        // m: 5, 7, missing, 3, 10 over declared 0..10.
        let p = plan(
            "SELECT m / 4 + f AS k, COUNT(*) FROM t GROUP BY k",
            &t.schema,
            100,
        )
        .unwrap();
        // m / 4 is 0..2, plus a flag 0..1: keys 0..3.
        assert_eq!(
            cell_keys(&p, &t.schema),
            vec![
                vec!["0"],
                vec!["1"],
                vec!["2"],
                vec!["3"],
                vec![MISSING_KEY]
            ]
        );
        // Rows: 5/4+1 = 2, 7/4+0 = 1, missing, 3/4+1 = 1, 10/4 + missing.
        assert_eq!(t.exact_values(&p)[0], vec![0, 2, 1, 0, 2]);
        let p = plan(
            "SELECT g, BIN(m, 3), COUNT(*), SUM(m) FROM t GROUP BY 1, 2",
            &t.schema,
            100,
        )
        .unwrap();
        let edges = fedq_dp::distribution::bin_edges(0, 10, 3);
        assert_eq!(edges, [0, 4, 8, 11]);
        let keys = cell_keys(&p, &t.schema);
        assert_eq!(keys[0], ["a", "[0, 4)"]);
        assert_eq!(keys[2], ["a", "[8, 10]"]);
        // a: 5 -> [4, 8), 7 -> [4, 8); b: missing, 10 -> [8, 10];
        // (missing) g: 3 -> [0, 4).
        let exact = t.exact_values(&p);
        assert_eq!(exact[0], vec![0, 2, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]);
        assert_eq!(exact[1], vec![0, 12, 0, 0, 0, 0, 10, 0, 3, 0, 0, 0]);
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
        let exact = t.exact_values(&p);
        assert_eq!(exact[0], vec![1, 1, 1]); // COUNT(*) where f = 1
        assert_eq!(exact[1], vec![5, 0, 3]); // SUM(m)
        assert_eq!(exact[2], vec![1, 0, 1]); // COUNT(m)
    }

    #[test]
    fn three_valued_not_excludes_missing() {
        let t = table();
        let p = plan("SELECT COUNT(*) FROM t WHERE NOT f = 1", &t.schema, 100).unwrap();
        assert_eq!(t.exact_values(&p), vec![vec![1]]);
        let p = plan(
            "SELECT COUNT(*) FROM t WHERE f IS NULL OR m BETWEEN 6 AND 9",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(t.exact_values(&p), vec![vec![2]]);
        let p = plan(
            "SELECT COUNT(*) FROM t WHERE g NOT IN ('a')",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(t.exact_values(&p), vec![vec![2]]);
    }

    #[test]
    fn columns_pack_by_declared_metadata() {
        let t = table();
        let widths: Vec<usize> = t.columns.iter().map(Packed::width).collect();
        assert_eq!(widths, vec![1, 1, 1]);
        assert_eq!(t.heap_bytes(), 15);
        let wide = |min: i64, max: i64| {
            Packed::new(&Column::Integer {
                name: "x".into(),
                min,
                max,
                bins: 1,
            })
            .width()
        };
        assert_eq!(wide(0, 254), 1);
        assert_eq!(wide(0, 255), 2);
        assert_eq!(wide(-1000, 1000), 2);
        assert_eq!(wide(0, 70_000), 4);
        assert_eq!(wide(-(1 << 40), 1 << 40), 8);
    }

    /// An append drops the cached key and plane bitmaps: a query after it
    /// sees the new rows, through freshly built bitmaps.
    #[test]
    fn appending_rows_invalidates_the_key_and_plane_bitmaps() {
        let mut t = table();
        let p = plan(
            "SELECT g, COUNT(*), SUM(m) FROM t WHERE f = 1 GROUP BY g",
            &t.schema,
            100,
        )
        .unwrap();
        assert_eq!(t.exact_values(&p), vec![vec![1, 1, 1], vec![5, 0, 3]]);
        assert!(t.derived[0].keys.get().is_some());
        assert!(t.derived[1].keys.get().is_some());
        assert!(t.derived[2].planes.get().is_some());
        let before = t.cached_bytes();
        assert!(before > 0);
        t.append_row_major(&[
            0, 1, 9, //
            1, 1, 2, //
        ]);
        assert!(t.derived.iter().all(|d| d.keys.get().is_none()));
        assert!(t.derived.iter().all(|d| d.planes.get().is_none()));
        assert_eq!(t.cached_bytes(), 0);
        assert_eq!(t.exact_values(&p), vec![vec![2, 2, 1], vec![14, 2, 3]]);
    }

    /// The budget of cached bitmaps is decided from the declared spans
    /// alone: key bitmaps for small spans, planes for integers, and no
    /// more than [`DERIVED_BITMAPS`] in all.
    #[test]
    fn cached_bitmaps_stay_within_the_budget() {
        let t = table();
        let keyed: Vec<bool> = t.derived.iter().map(|d| d.keyed).collect();
        let planes: Vec<Option<u32>> = t.derived.iter().map(|d| d.plane_count).collect();
        assert_eq!(keyed, vec![true, true, true]);
        // m is 0..=10: offsets up to 10 need 4 bits.
        assert_eq!(planes, vec![None, None, Some(4)]);
        let many: Vec<ColumnSpec> = (0..10)
            .map(|i| ColumnSpec {
                open: None,
                name: format!("c{i}"),
                kind: ColumnType::Integer,
                domain: None,
                min: Some(0),
                max: Some(63),
                bins: None,
            })
            .collect();
        let t = Table::new(Schema::from_specs("t", &many).unwrap());
        let spent: usize = t
            .derived
            .iter()
            .map(|d| usize::from(d.keyed) * 64 + d.plane_count.unwrap_or(0) as usize)
            .sum();
        assert!(spent <= DERIVED_BITMAPS, "{spent}");
        assert!(!t.derived[9].keyed);
        assert!(t.derived[0].keyed);
    }

    /// With a person-level unit (truncation), missing values and random
    /// filters, grouped COUNT, COUNT(col) and SUM by bitmap intersection
    /// equal the row-at-a-time kernels over the same selected rows, and
    /// a bitmap-built filter selects the rows a code scan does.
    #[test]
    fn bitmap_aggregates_equal_the_row_at_a_time_kernels() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let spec =
            |name: &str, kind, domain: Option<usize>, bounds: Option<(i64, i64)>| ColumnSpec {
                open: None,
                name: name.into(),
                kind,
                domain: domain.map(|n| (0..n).map(|i| format!("v{i}")).collect()),
                min: bounds.map(|b| b.0),
                max: bounds.map(|b| b.1),
                bins: None,
            };
        let schema = Schema::from_specs(
            "t",
            &[
                spec("g", ColumnType::Categorical, Some(3), None),
                spec("a", ColumnType::Categorical, Some(9), None),
                spec("f", ColumnType::Boolean, None, None),
                spec("m", ColumnType::Integer, None, Some((-3, 120))),
            ],
        )
        .unwrap()
        .with_person_unit("pid", 2)
        .unwrap();
        let rows = 64 * 1100 + 37;
        let mut codes = Vec::new();
        for _ in 0..rows {
            for (c, hi) in [3i64, 9, 2].into_iter().enumerate() {
                let v = rng.random_range(0..hi);
                codes.push(if rng.random_bool(0.1 + 0.05 * c as f64) {
                    MISSING
                } else {
                    v
                });
            }
            codes.push(if rng.random_bool(0.1) {
                MISSING
            } else {
                rng.random_range(-3..=120)
            });
            codes.push(rng.random_range(0..rows as i64 / 2));
        }
        let mut t = Table::new(schema.clone());
        t.append_row_major(&codes);
        assert!(t.kept_rows().is_some());
        for sql in [
            "SELECT g, a, COUNT(*), SUM(m), AVG(m) FROM t WHERE f = 1 GROUP BY g, a",
            "SELECT a, COUNT(*), SUM(m) FROM t GROUP BY a",
            "SELECT COUNT(*), SUM(m) FROM t WHERE a IN ('v1', 'v3', 'v8') AND NOT g = 'v0'",
            "SELECT f, g, COUNT(*) FROM t WHERE m >= 40 OR a IS NULL GROUP BY f, g",
        ] {
            let p = plan(sql, &t.schema, 100).unwrap();
            let exact = t.exact_values(&p);
            let selected = t.selected(&p);
            let cells = t.cells(&p);
            for (m, got) in p.measurements.iter().zip(&exact) {
                let mut old = vec![0i64; got.len()];
                let column = match m {
                    MeasurementSpec::CountPresent { column }
                    | MeasurementSpec::Sum { column, .. } => Some(*column),
                    _ => None,
                };
                let bits = match column {
                    Some(c) => and(&selected, t.present(c)),
                    None => selected.to_vec(),
                };
                match (m, &cells) {
                    (MeasurementSpec::Sum { min, max, .. }, _) => {
                        let Codes::U8(v) = &t.columns[3].codes else {
                            panic!("m packs in one byte")
                        };
                        sum_bits(&bits, cells.as_deref(), v, -3, (*min, *max), &mut old);
                    }
                    (_, Some(cells)) => count_bits(&bits, cells, &mut old),
                    (_, None) => old[0] = bits.iter().map(|w| i64::from(w.count_ones())).sum(),
                }
                assert_eq!(got, &old, "{sql}: {m:?}");
            }
            // The filter by key bitmaps selects what a scan of the codes does.
            if let Some(filter) = &p.filter {
                let scanned = reference_rows(&t, filter);
                let kept = t.kept_rows().unwrap();
                assert_eq!(*selected, and(&scanned, kept)[..], "{sql}");
            }
        }
    }

    /// The rows where `p` is TRUE, by scanning codes one row at a time.
    fn reference_rows(t: &Table, p: &Predicate) -> Bits {
        let rows: Vec<Vec<i64>> = (0..t.len())
            .map(|i| {
                (0..t.columns.len())
                    .map(|c| {
                        let col = &t.columns[c];
                        let code = t.code_at(c, i);
                        if code == col.span {
                            MISSING
                        } else {
                            col.base + code as i64
                        }
                    })
                    .collect()
            })
            .collect();
        let truth: Vec<u8> = (0..rows.len())
            .map(|i| u8::from(reference::is_true(&rows, i, p)))
            .collect();
        pack_bits(&truth, |x| x == 1)
    }

    /// The engine before packing, row at a time over `i64` codes: the
    /// reference the compact engine must agree with.
    mod reference {
        use super::*;

        const FALSE: u8 = 0;
        const TRUE: u8 = 1;
        const UNKNOWN: u8 = 2;

        fn truth(rows: &[Vec<i64>], i: usize, p: &Predicate) -> u8 {
            let present = |c: usize, f: &dyn Fn(i64) -> bool| {
                let v = rows[i][c];
                if v == MISSING {
                    UNKNOWN
                } else {
                    u8::from(f(v))
                }
            };
            match p {
                Predicate::And(a, b) => match (truth(rows, i, a), truth(rows, i, b)) {
                    (FALSE, _) | (_, FALSE) => FALSE,
                    (TRUE, TRUE) => TRUE,
                    _ => UNKNOWN,
                },
                Predicate::Or(a, b) => match (truth(rows, i, a), truth(rows, i, b)) {
                    (TRUE, _) | (_, TRUE) => TRUE,
                    (FALSE, FALSE) => FALSE,
                    _ => UNKNOWN,
                },
                Predicate::Not(a) => match truth(rows, i, a) {
                    TRUE => FALSE,
                    FALSE => TRUE,
                    u => u,
                },
                Predicate::Cmp { column, op, value } => present(*column, &|v| match op {
                    CmpOp::Eq => v == *value,
                    CmpOp::Ne => v != *value,
                    CmpOp::Lt => v < *value,
                    CmpOp::Le => v <= *value,
                    CmpOp::Gt => v > *value,
                    CmpOp::Ge => v >= *value,
                }),
                Predicate::In {
                    column,
                    values,
                    negated,
                } => present(*column, &|v| values.contains(&v) != *negated),
                Predicate::Between {
                    column,
                    low,
                    high,
                    negated,
                } => present(*column, &|v| (v >= *low && v <= *high) != *negated),
                Predicate::IsMissing { column, negated } => {
                    u8::from((rows[i][*column] == MISSING) != *negated)
                }
                Predicate::Columns {
                    left,
                    op,
                    right,
                    relabel,
                } => {
                    let (x, y) = (rows[i][*left], rows[i][*right]);
                    if x == MISSING || y == MISSING {
                        UNKNOWN
                    } else {
                        let x = relabel.as_ref().map_or(x, |m| m[x as usize]);
                        u8::from(op.holds(x, y))
                    }
                }
            }
        }

        /// Whether `p` is TRUE for row `i`.
        pub fn is_true(rows: &[Vec<i64>], i: usize, p: &Predicate) -> bool {
            truth(rows, i, p) == TRUE
        }

        pub fn exact(rows: &[Vec<i64>], plan: &Plan) -> Vec<Vec<i64>> {
            let mut out: Vec<Vec<i64>> = plan
                .measurements
                .iter()
                .map(|m| vec![0i64; cell_count(plan) * m.values_per_cell()])
                .collect();
            for (i, row) in rows.iter().enumerate() {
                if let Some(p) = &plan.filter {
                    if truth(rows, i, p) != TRUE {
                        continue;
                    }
                }
                let mut cell = 0usize;
                for (&col, &size) in plan.group_by.iter().zip(&plan.group_sizes) {
                    let v = row[col];
                    let key = if v == MISSING { size } else { v as usize };
                    cell = cell * (size + 1) + key;
                }
                for (m, out) in plan.measurements.iter().zip(out.iter_mut()) {
                    match m {
                        MeasurementSpec::CountRows => out[cell] += 1,
                        MeasurementSpec::CountWhere { condition, .. } => {
                            out[cell] += i64::from(is_true(rows, i, condition))
                        }
                        MeasurementSpec::CountPresent { column } => {
                            out[cell] += i64::from(row[*column] != MISSING)
                        }
                        MeasurementSpec::Sum { column, min, max } => {
                            let v = row[*column];
                            if v != MISSING {
                                out[cell] = out[cell].saturating_add(v.clamp(*min, *max));
                            }
                        }
                        MeasurementSpec::Histogram {
                            column,
                            min,
                            max,
                            bins,
                        } => {
                            let v = row[*column];
                            if v != MISSING {
                                // Reference binning by the edges, not bin_of.
                                let edges = fedq_dp::distribution::bin_edges(*min, *max, *bins);
                                let b = edges
                                    .windows(2)
                                    .position(|w| w[0] <= v && v < w[1])
                                    .unwrap();
                                out[cell * *bins as usize + b] += 1;
                            }
                        }
                        MeasurementSpec::SumSquares {
                            column,
                            center,
                            min,
                            max,
                        } => {
                            let v = row[*column];
                            if v != MISSING {
                                let d = v.clamp(*min, *max) - center;
                                out[cell] = out[cell].saturating_add(d * d);
                            }
                        }
                        MeasurementSpec::SumOf { expr, min, max, .. } => {
                            if let Some(v) = value(row, expr) {
                                let v = v.clamp(i128::from(*min), i128::from(*max)) as i64;
                                out[cell] = out[cell].saturating_add(v);
                            }
                        }
                        MeasurementSpec::CountOf { expr, .. } => {
                            out[cell] += i64::from(value(row, expr).is_some())
                        }
                    }
                }
            }
            out
        }

        /// A per-row expression's value, written out again here (NULL
        /// propagates; COALESCE takes the first non-NULL argument).
        fn value(row: &[i64], e: &RowExpr) -> Option<i128> {
            let both = |a: &RowExpr, b: &RowExpr| Some((value(row, a)?, value(row, b)?));
            match e {
                RowExpr::Column(c) => (row[*c] != MISSING).then(|| i128::from(row[*c])),
                RowExpr::Const(k) => Some(i128::from(*k)),
                RowExpr::Coalesce(args) => args.iter().find_map(|a| value(row, a)),
                RowExpr::Add(a, b) => both(a, b).map(|(x, y)| x + y),
                RowExpr::Sub(a, b) => both(a, b).map(|(x, y)| x - y),
                RowExpr::Mul(a, b) => both(a, b).map(|(x, y)| x * y),
                RowExpr::Div(a, k) => value(row, a).map(|x| x / i128::from(*k)),
            }
        }
    }

    /// Random schemas (every packing width), random rows with missing
    /// values, random nested predicates, group-bys and measurements: the
    /// compact engine agrees with the row-at-a-time reference exactly.
    /// The eight-at-a-time sum of one-byte codes equals the plain sum over
    /// the set bits, for every length around word boundaries and for
    /// sparse, dense, full and empty masks.
    #[test]
    fn swar_byte_sum_equals_the_plain_sum() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for len in (0..260).chain([1000, 4096, 4097]) {
            for density in [0.0, 0.1, 0.5, 1.0] {
                let codes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let keep: Vec<bool> = (0..len).map(|_| rng.random_bool(density)).collect();
                let bits = pack_bits(
                    &keep.iter().map(|&k| u8::from(k)).collect::<Vec<_>>(),
                    |k| k == 1,
                );
                let base = rng.random_range(-1000..1000);
                let plain: i64 = codes
                    .iter()
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|(&c, _)| base + i64::from(c))
                    .sum();
                assert_eq!(
                    sum_u8(&bits, &codes, base),
                    plain,
                    "len {len}, density {density}"
                );
            }
        }
    }

    #[test]
    fn compact_engine_matches_the_row_at_a_time_reference() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for round in 0..60 {
            let ncols = rng.random_range(1..7);
            let mut specs = Vec::new();
            for c in 0..ncols {
                let name = format!("c{c}");
                specs.push(match rng.random_range(0..3) {
                    0 => {
                        let n = [1usize, 2, 5, 254, 255, 300][rng.random_range(0..6)];
                        ColumnSpec {
                            open: None,
                            name,
                            kind: ColumnType::Categorical,
                            domain: Some((0..n).map(|i| format!("v{i}")).collect()),
                            min: None,
                            max: None,
                            bins: None,
                        }
                    }
                    1 => ColumnSpec {
                        open: None,
                        name,
                        kind: ColumnType::Boolean,
                        domain: None,
                        min: None,
                        max: None,
                        bins: None,
                    },
                    _ => {
                        let (min, max) = [
                            (0i64, 10i64),
                            (-5, 5),
                            (2002, 2025),
                            (0, 254),
                            (-1000, 70_000),
                            (-(1 << 40), 1 << 40),
                            (7, 7),
                        ][rng.random_range(0..7)];
                        ColumnSpec {
                            open: None,
                            name,
                            kind: ColumnType::Integer,
                            domain: None,
                            min: Some(min),
                            max: Some(max),
                            bins: None,
                        }
                    }
                });
            }
            let schema = Schema::from_specs("t", &specs).unwrap();
            // Values concentrated near the bounds and a few literals, so
            // that comparisons hit, miss and straddle.
            let value = |rng: &mut rand_chacha::ChaCha8Rng, c: &Column| -> i64 {
                if rng.random_bool(0.15) {
                    return MISSING;
                }
                let (base, span) = layout(c);
                let off = if span > 8 && rng.random_bool(0.5) {
                    rng.random_range(0..4.min(span))
                } else {
                    rng.random_range(0..span)
                };
                base + off as i64
            };
            let rows_n = rng.random_range(0..300) + if round % 5 == 0 { 5000 } else { 0 };
            let rows: Vec<Vec<i64>> = (0..rows_n)
                .map(|_| schema.columns.iter().map(|c| value(&mut rng, c)).collect())
                .collect();
            let mut t = Table::new(schema.clone());
            // Append in uneven pieces, as chunks arrive from the store.
            let flat: Vec<i64> = rows.iter().flatten().copied().collect();
            let mut at = 0;
            while at < flat.len() {
                let take = (rng.random_range(1..200) * ncols).min(flat.len() - at);
                t.append_row_major(&flat[at..at + take]);
                at += take;
            }
            assert_eq!(t.len(), rows_n);

            let groupable: Vec<usize> = (0..ncols)
                .filter(|&c| schema.columns[c].domain_size().is_some())
                .collect();
            for _ in 0..25 {
                let mut group_by = Vec::new();
                for &c in &groupable {
                    if group_by.len() < 3 && rng.random_bool(0.4) {
                        group_by.push(c);
                    }
                }
                let group_sizes = group_by
                    .iter()
                    .map(|&c| schema.columns[c].domain_size().unwrap())
                    .collect();
                let mut measurements = vec![MeasurementSpec::CountRows];
                if rng.random_bool(0.5) {
                    measurements.push(MeasurementSpec::CountWhere {
                        condition: random_predicate(&mut rng, &schema, &rows, 2),
                        text: String::new(),
                    });
                }
                for c in 0..ncols {
                    if rng.random_bool(0.3) {
                        measurements.push(MeasurementSpec::CountPresent { column: c });
                    }
                    if let Column::Integer { min, max, .. } = schema.columns[c] {
                        if rng.random_bool(0.5) {
                            // Sometimes narrower than declared, to exercise clamping.
                            let (lo, hi) = if rng.random_bool(0.5) {
                                (min, max)
                            } else {
                                (min / 2 + 1, max / 2)
                            };
                            measurements.push(MeasurementSpec::Sum {
                                column: c,
                                min: lo.min(hi),
                                max: hi.max(lo),
                            });
                        }
                        if rng.random_bool(0.3) && max - min < 1 << 20 {
                            let values = (max - min) as u64 + 1;
                            measurements.push(MeasurementSpec::Histogram {
                                column: c,
                                min,
                                max,
                                bins: rng.random_range(1..=values.min(17)),
                            });
                        }
                        if rng.random_bool(0.3) && max - min < 1 << 20 {
                            measurements.push(MeasurementSpec::SumSquares {
                                column: c,
                                center: min + (max - min) / 2,
                                min,
                                max,
                            });
                        }
                    }
                }
                // A per-row expression over small-bounded numeric columns.
                let numeric: Vec<usize> = (0..ncols)
                    .filter(|&c| match schema.columns[c] {
                        Column::Boolean { .. } => true,
                        Column::Integer { min, max, .. } => min > -(1 << 18) && max < 1 << 18,
                        _ => false,
                    })
                    .collect();
                if !numeric.is_empty() && rng.random_bool(0.5) {
                    let expr = random_row_expr(&mut rng, &numeric, 2);
                    let bound = fedq_plan::plan::MAX_EXPR_BOUND;
                    if let Some((lo, hi)) = expr
                        .bounds(&schema)
                        .filter(|&(lo, hi)| lo >= -bound && hi <= bound)
                    {
                        measurements.push(MeasurementSpec::CountOf {
                            expr: expr.clone(),
                            text: String::new(),
                        });
                        measurements.push(MeasurementSpec::SumOf {
                            expr,
                            text: String::new(),
                            min: lo as i64,
                            // Sometimes narrower than derived: clamping.
                            max: if rng.random_bool(0.3) {
                                (lo + hi) / 2
                            } else {
                                hi
                            } as i64,
                        });
                    }
                }
                let filter = rng
                    .random_bool(0.85)
                    .then(|| random_predicate(&mut rng, &schema, &rows, 3));
                let p = Plan {
                    buckets: Vec::new(),
                    schema_columns: schema.columns.len(),
                    open_key: None,
                    dataset: "t".into(),
                    group_by,
                    group_sizes,
                    outputs: Vec::new(),
                    measurements,
                    filter,
                    contribution_bound: 1,
                };
                assert_eq!(t.exact_values(&p), reference::exact(&rows, &p), "{p:?}");
            }
        }
    }

    fn random_row_expr(
        rng: &mut rand_chacha::ChaCha8Rng,
        numeric: &[usize],
        depth: usize,
    ) -> RowExpr {
        use rand::Rng;
        let sub = |rng: &mut rand_chacha::ChaCha8Rng| {
            Box::new(random_row_expr(rng, numeric, depth.saturating_sub(1)))
        };
        match rng.random_range(0..if depth == 0 { 2 } else { 7 }) {
            0 => RowExpr::Column(numeric[rng.random_range(0..numeric.len())]),
            1 => RowExpr::Const(rng.random_range(-20..20)),
            2 => RowExpr::Coalesce(vec![*sub(rng), *sub(rng)]),
            3 => RowExpr::Add(sub(rng), sub(rng)),
            4 => RowExpr::Sub(sub(rng), sub(rng)),
            5 => RowExpr::Mul(sub(rng), sub(rng)),
            _ => RowExpr::Div(sub(rng), [-7, -1, 2, 12][rng.random_range(0..4)]),
        }
    }

    fn random_predicate(
        rng: &mut rand_chacha::ChaCha8Rng,
        schema: &Schema,
        rows: &[Vec<i64>],
        depth: usize,
    ) -> Predicate {
        use rand::Rng;
        let column = rng.random_range(0..schema.columns.len());
        // A literal: usually a value from the data, sometimes one outside
        // the declared range or the missing code.
        let literal = |rng: &mut rand_chacha::ChaCha8Rng| -> i64 {
            let (base, span) = layout(&schema.columns[column]);
            match rng.random_range(0..10) {
                0 => base - 1,
                1 => base + span as i64,
                2 => MISSING,
                3 => base + rng.random_range(0..span) as i64,
                _ if !rows.is_empty() => {
                    let v = rows[rng.random_range(0..rows.len())][column];
                    if v == MISSING {
                        base
                    } else {
                        v
                    }
                }
                _ => base,
            }
        };
        let sub = |rng: &mut rand_chacha::ChaCha8Rng| {
            Box::new(random_predicate(rng, schema, rows, depth - 1))
        };
        // Two columns compared: numbers by value, categories through a
        // random relabelling (as the planner's by label), else a literal.
        let other = rng.random_range(0..schema.columns.len());
        let op = [
            CmpOp::Eq,
            CmpOp::Ne,
            CmpOp::Lt,
            CmpOp::Le,
            CmpOp::Gt,
            CmpOp::Ge,
        ][rng.random_range(0..6)];
        let numeric = |c: &Column| matches!(c, Column::Integer { .. } | Column::Boolean { .. });
        let columns = match (&schema.columns[column], &schema.columns[other]) {
            (a, b) if numeric(a) && numeric(b) => Some(None),
            (Column::Categorical { domain: a, .. }, Column::Categorical { domain: b, .. }) => {
                Some(Some(
                    (0..a.len())
                        .map(|_| rng.random_range(-1..b.len() as i64))
                        .collect(),
                ))
            }
            (Column::Open { .. }, Column::Open { .. }) => Some(None),
            _ => None,
        };
        if let Some(relabel) = columns.filter(|_| rng.random_bool(0.15)) {
            let op = if relabel.is_some() || !numeric(&schema.columns[column]) {
                [CmpOp::Eq, CmpOp::Ne][rng.random_range(0..2)]
            } else {
                op
            };
            return Predicate::Columns {
                left: column,
                op,
                right: other,
                relabel,
            };
        }
        match rng.random_range(0..if depth == 0 { 5 } else { 8 }) {
            0 => Predicate::Cmp {
                column,
                op: [
                    CmpOp::Eq,
                    CmpOp::Ne,
                    CmpOp::Lt,
                    CmpOp::Le,
                    CmpOp::Gt,
                    CmpOp::Ge,
                ][rng.random_range(0..6)],
                value: literal(rng),
            },
            1 => Predicate::In {
                column,
                values: (0..rng.random_range(0..5)).map(|_| literal(rng)).collect(),
                negated: rng.random_bool(0.5),
            },
            2 => Predicate::Between {
                column,
                low: literal(rng),
                high: literal(rng),
                negated: rng.random_bool(0.5),
            },
            3 => Predicate::IsMissing {
                column,
                negated: rng.random_bool(0.5),
            },
            4 => Predicate::Cmp {
                column,
                op: CmpOp::Eq,
                value: literal(rng),
            },
            5 => Predicate::And(sub(rng), sub(rng)),
            6 => Predicate::Or(sub(rng), sub(rng)),
            _ => Predicate::Not(sub(rng)),
        }
    }
}
