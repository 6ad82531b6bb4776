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
//! Exact results computed here never leave the node: [`Table::exact`] is
//! `pub(crate)` and its only caller is [`crate::service`], which passes them
//! straight into [`crate::mechanism`] inside the request's blocking task.

use std::sync::OnceLock;

use crate::plan::{CmpOp, MeasurementSpec, Plan, Predicate};
use crate::schema::{Column, Schema, MISSING};

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

    /// The offset of value code `v` (a [`crate::schema`] code), or `None`
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

/// The three-valued truth of a predicate for every row: `t` where it is
/// TRUE, `f` where it is FALSE, neither where it is UNKNOWN.
struct Truth {
    t: Bits,
    f: Bits,
}

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
    /// Per open-domain column: the label of every code seen at ingest
    /// (shown only for keys a threshold released).
    labels: std::collections::HashMap<usize, std::collections::HashMap<u64, String>>,
}

impl Table {
    /// An empty table for `schema`.
    pub fn new(schema: Schema) -> Table {
        let columns: Vec<Packed> = schema.columns.iter().map(Packed::new).collect();
        let present = columns.iter().map(|_| OnceLock::new()).collect();
        Table {
            schema,
            columns,
            kept: OnceLock::new(),
            present,
            labels: Default::default(),
        }
    }

    /// Sets the labels of open-domain column `column` (from the store).
    pub(crate) fn set_labels(
        &mut self,
        column: usize,
        labels: std::collections::HashMap<u64, String>,
    ) {
        self.labels.insert(column, labels);
    }

    /// The label of key `code` of open-domain column `column`:
    /// [`MISSING_KEY`] for the missing code; `None` if no ingest recorded
    /// one (the store is damaged).
    pub(crate) fn open_label(&self, column: usize, code: u64) -> Option<String> {
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
    /// a row), as [`crate::ingest`] encodes them.
    ///
    /// # Panics
    /// If a code lies outside its column's declared domain or bounds:
    /// ingest never produces one, and the store is loaded through
    /// [`Table::append_chunk`], which reports damage as an error instead.
    pub fn append_row_major(&mut self, codes: &[i64]) {
        let width = self.columns.len();
        self.forget_present();
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
    pub(crate) fn append_chunk(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.kept = OnceLock::new();
        let (head, mut rest) = bytes
            .split_first_chunk::<4>()
            .ok_or("a stored chunk is truncated")?;
        let rows = u32::from_le_bytes(*head) as usize;
        self.forget_present();
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

    /// Drops the cached present-rows bitmaps (the rows are changing).
    fn forget_present(&mut self) {
        for p in &mut self.present {
            p.take();
        }
    }

    /// Number of rows. Internal only: never released without noise.
    pub(crate) fn len(&self) -> usize {
        self.columns.first().map_or(0, Packed::len)
    }

    /// Approximate heap bytes held by the columns (for capacity planning).
    pub fn heap_bytes(&self) -> usize {
        self.columns.iter().map(|c| c.len() * c.width()).sum()
    }

    /// Computes the exact value of every measurement of `plan`, one vector
    /// per measurement with one value per cell (in cell order, see
    /// [`cell_keys`]). Sums clamp each value to the measurement's bounds.
    pub(crate) fn exact(&self, plan: &Plan) -> Vec<Vec<i64>> {
        let selected = self.selected(plan);
        let cells = self.cells(plan);
        let count = cell_count(plan);
        plan.measurements
            .iter()
            .map(|m| {
                let mut out = vec![0i64; count * m.values_per_cell()];
                match m {
                    MeasurementSpec::CountRows => count_bits(&selected, cells.as_deref(), &mut out),
                    MeasurementSpec::CountPresent { column } => {
                        let bits = and(&selected, self.present(*column));
                        count_bits(&bits, cells.as_deref(), &mut out);
                    }
                    MeasurementSpec::Sum { column, min, max } => {
                        let bits = and(&selected, self.present(*column));
                        let p = &self.columns[*column];
                        // Every stored value already lies within the bounds
                        // (the clamp is a no-op): one byte per value sums
                        // eight at a time.
                        let unclamped = *min <= p.base
                            && p.span > 0
                            && p.base.saturating_add(p.span as i64 - 1) <= *max;
                        if let (Codes::U8(v), None, true) = (&p.codes, &cells, unclamped) {
                            out[0] = sum_u8(&bits, v, p.base);
                            return out;
                        }
                        with_codes!(&p.codes, v => sum_bits(
                            &bits,
                            cells.as_deref(),
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
                        with_codes!(&p.codes, v => for_each_bit(&bits, |i| {
                            let value = p.base + v[i].to_u64() as i64;
                            let cell = cells.as_deref().map_or(0, |c| c[i] as usize);
                            out[cell * k + crate::distribution::bin_of(value, *min, *max, *bins)] += 1;
                        }));
                    }
                    MeasurementSpec::SumSquares {
                        column,
                        center,
                        min,
                        max,
                    } => {
                        let bits = and(&selected, self.present(*column));
                        let p = &self.columns[*column];
                        with_codes!(&p.codes, v => for_each_bit(&bits, |i| {
                            let d = (p.base + v[i].to_u64() as i64).clamp(*min, *max) - center;
                            let cell = cells.as_deref().map_or(0, |c| c[i] as usize);
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
    pub(crate) fn open_counts(&self, plan: &Plan) -> std::collections::HashMap<u64, i64> {
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
    fn selected(&self, plan: &Plan) -> Bits {
        let selected = match &plan.filter {
            Some(p) => self.eval(p).t,
            None => all_rows(self.len()),
        };
        match self.kept_rows() {
            Some(kept) => and(&selected, kept),
            None => selected,
        }
    }

    /// Exposes [`Table::exact`] to the criterion benches (feature
    /// `bench-internals`, never enabled in the node binary).
    #[cfg(feature = "bench-internals")]
    #[doc(hidden)]
    pub fn exact_for_bench(&self, plan: &Plan) -> Vec<Vec<i64>> {
        self.exact(plan)
    }

    /// The dense cell index of every row, or `None` without GROUP BY.
    /// Mixed radix over the group columns, first column most significant;
    /// each column's key is its stored offset (its missing code is its
    /// last key).
    fn cells(&self, plan: &Plan) -> Option<Vec<u32>> {
        let (&first, rest) = plan.group_by.split_first()?;
        let mut cells: Vec<u32> = with_codes!(&self.columns[first].codes, v => v.iter().map(|&c| c.to_u64() as u32).collect());
        for (&col, &size) in rest.iter().zip(&plan.group_sizes[1..]) {
            with_codes!(&self.columns[col].codes, v => add_key(&mut cells, v, size as u32 + 1));
        }
        Some(cells)
    }

    /// Rows where `column` is not missing (cached).
    fn present(&self, column: usize) -> &Bits {
        self.present[column].get_or_init(|| {
            let p = &self.columns[column];
            with_codes!(&p.codes, v => present_bits(v, p.span))
        })
    }

    /// Evaluates a predicate over all rows, three-valued.
    fn eval(&self, p: &Predicate) -> Truth {
        match p {
            Predicate::And(a, b) => {
                let (x, y) = (self.eval(a), self.eval(b));
                Truth {
                    t: and(&x.t, &y.t),
                    f: or(&x.f, &y.f),
                }
            }
            Predicate::Or(a, b) => {
                let (x, y) = (self.eval(a), self.eval(b));
                Truth {
                    t: or(&x.t, &y.t),
                    f: and(&x.f, &y.f),
                }
            }
            Predicate::Not(a) => {
                let x = self.eval(a);
                Truth { t: x.f, f: x.t }
            }
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
                self.leaf(*column, &test, negated)
            }
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => {
                let test = Test::range(&self.columns[*column], (*low).into(), (*high).into());
                self.leaf(*column, &test, *negated)
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
                self.leaf(*column, &test, *negated)
            }
            Predicate::IsMissing { column, negated } => {
                let present = self.present(*column).clone();
                let missing = not(&present, self.len());
                if *negated {
                    Truth {
                        t: present,
                        f: missing,
                    }
                } else {
                    Truth {
                        t: missing,
                        f: present,
                    }
                }
            }
        }
    }

    /// The truth of `test` (negated if asked) on `column`: unknown where
    /// the value is missing.
    fn leaf(&self, column: usize, test: &Test, negated: bool) -> Truth {
        let p = &self.columns[column];
        let present = self.present(column);
        let hit = match test {
            Test::Never => vec![0; present.len()],
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
        };
        // Every hit is present (tests only admit valid offsets).
        let miss = and_not(present, &hit);
        if negated {
            Truth { t: miss, f: hit }
        } else {
            Truth { t: hit, f: miss }
        }
    }
}

/// Encodes row-major codes (as [`crate::ingest`] produces them) into one
/// stored chunk: the row count (`u32` LE), then each column in declaration
/// order as its packing width (one byte: 1, 2, 4 or 8) followed by every
/// row's offset, little-endian, in that width. A chunk is the in-memory
/// packing written out, so loading one is a copy.
///
/// Fails, naming the column, if a code lies outside its declared domain or
/// bounds (ingest validates every cell, so this means a bug upstream).
pub(crate) fn encode_chunk(schema: &Schema, codes: &[i64]) -> Result<Vec<u8>, String> {
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

fn or(a: &[u64], b: &[u64]) -> Bits {
    a.iter().zip(b).map(|(x, y)| x | y).collect()
}

fn and_not(a: &[u64], b: &[u64]) -> Bits {
    a.iter().zip(b).map(|(x, y)| x & !y).collect()
}

/// The rows of `rows` not in `a`.
fn not(a: &[u64], rows: usize) -> Bits {
    and_not(&all_rows(rows), a)
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
fn count_bits(bits: &[u64], cells: Option<&[u32]>, out: &mut [i64]) {
    let Some(cells) = cells else {
        out[0] = bits.iter().map(|w| i64::from(w.count_ones())).sum();
        return;
    };
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

/// Number of released cells: each GROUP BY column contributes its declared
/// domain plus a "missing" key.
pub fn cell_count(plan: &Plan) -> usize {
    plan.group_sizes.iter().map(|s| s + 1).product()
}

/// The stored code of a missing value in an open-domain column (its
/// packing's missing code), as a key of [`Table::open_counts`].
pub const OPEN_MISSING_KEY: u64 = 1 << 63;

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
            }
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
                                let edges = crate::distribution::bin_edges(*min, *max, *bins);
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
                    }
                }
            }
            out
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
                let filter = rng
                    .random_bool(0.85)
                    .then(|| random_predicate(&mut rng, &schema, &rows, 3));
                let p = Plan {
                    open_key: None,
                    dataset: "t".into(),
                    group_by,
                    group_sizes,
                    outputs: Vec::new(),
                    measurements,
                    filter,
                    contribution_bound: 1,
                };
                assert_eq!(t.exact(&p), reference::exact(&rows, &p), "{p:?}");
            }
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
