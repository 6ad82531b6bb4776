//! Word-at-a-time kernels over row bitmaps (one bit per row, bit `i % 64`
//! of word `i / 64`; bits past the last row are 0).
//!
//! The engine ([`crate::table`]) answers COUNT, and SUM over bit-sliced
//! columns, by counting the set bits of intersections of cached bitmaps.
//! The default x86-64 target has no `popcnt` instruction, so
//! `u64::count_ones` would compile to a software sequence: every kernel
//! here is compiled four times (AVX-512 with its vector population count,
//! AVX2 + POPCNT, POPCNT alone, portable) and the best one the CPU
//! supports is chosen at run time, the pattern of
//! `std::arch`. On other architectures only the portable build exists (on
//! aarch64 it already uses the NEON count).
//!
//! No kernel uses `unsafe` beyond calling its own feature-enabled build
//! after the feature was detected.

/// A build of the kernels: which instructions they may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    /// Baseline instructions only.
    Portable,
    /// x86-64 with the `popcnt` instruction.
    Popcnt,
    /// x86-64 with `popcnt` and AVX2 (counts 256 bits at a time).
    Avx2,
    /// x86-64 with AVX-512 and its vector population count (`VPOPCNTQ`:
    /// counts 512 bits at a time in one instruction).
    Avx512,
}

impl Tier {
    /// The best tier this CPU supports (detection is cached by `std`).
    pub(crate) fn best() -> Tier {
        #[cfg(target_arch = "x86_64")]
        {
            if Tier::Avx512.allowed() {
                return Tier::Avx512;
            }
            if is_x86_feature_detected!("popcnt") {
                if is_x86_feature_detected!("avx2") {
                    return Tier::Avx2;
                }
                return Tier::Popcnt;
            }
        }
        Tier::Portable
    }

    /// Every tier this CPU supports, the portable one first (for tests).
    #[cfg(test)]
    pub(crate) fn supported() -> Vec<Tier> {
        [Tier::Portable, Tier::Popcnt, Tier::Avx2, Tier::Avx512]
            .into_iter()
            .filter(|&t| t == Tier::Portable || t.allowed())
            .collect()
    }

    /// Whether the CPU supports this tier.
    fn allowed(self) -> bool {
        match self {
            Tier::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Tier::Popcnt => is_x86_feature_detected!("popcnt"),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx2 => is_x86_feature_detected!("popcnt") && is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Tier::Avx512 => {
                Tier::Avx2.allowed()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vpopcntdq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Tier::Popcnt | Tier::Avx2 | Tier::Avx512 => false,
        }
    }
}

/// Defines `$name` (best tier) and `$name_in` (a given tier, falling back
/// to the portable build if the CPU lacks it) around the inlined body
/// `$imp`, compiled once per tier.
macro_rules! kernel {
    (
        $(#[$doc:meta])*
        fn $name:ident / $name_in:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $imp:ident
    ) => {
        $(#[$doc])*
        pub(crate) fn $name($($arg: $ty),*) $(-> $ret)? {
            $name_in(Tier::best(), $($arg),*)
        }

        /// As the function without `_in`, built for `tier` (portable if
        /// the CPU does not support `tier`).
        pub(crate) fn $name_in(tier: Tier, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx2,popcnt")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "avx2,popcnt")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                #[target_feature(enable = "popcnt")]
                fn popcnt($($arg: $ty),*) $(-> $ret)? {
                    $imp($($arg),*)
                }
                if tier.allowed() {
                    match tier {
                        // SAFETY: `tier.allowed()` detected AVX-512 F, BW,
                        // VL and VPOPCNTDQ, AVX2 and POPCNT on this CPU.
                        Tier::Avx512 => return unsafe { avx512($($arg),*) },
                        // SAFETY: `tier.allowed()` detected AVX2 and POPCNT
                        // on this CPU.
                        Tier::Avx2 => return unsafe { avx2($($arg),*) },
                        // SAFETY: `tier.allowed()` detected POPCNT on this
                        // CPU.
                        Tier::Popcnt => return unsafe { popcnt($($arg),*) },
                        Tier::Portable => {}
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = tier;
            $imp($($arg),*)
        }
    };
}

kernel! {
    /// Per GROUP BY cell, the number of rows of `start` in that cell and,
    /// for each bitmap of `planes`, the number of those rows also set in
    /// it: `out[cell * (1 + planes.len()) + j]` is increased by the count
    /// (`j = 0`) or the count within `planes[j - 1]`.
    ///
    /// Cells are numbered as [`fedq_plan::plan::cell_keys`] lists them: mixed
    /// radix over `keys`, the first most significant, each column's keys
    /// being its valid keys in order then its missing key. The rows of a
    /// cell are `start ∩ key₁ ∩ key₂ ∩ …`, intersected a block of words at
    /// a time (so every operand stays in the L1 cache), each prefix
    /// intersection computed once per block and shared by the cells below
    /// it.
    ///
    /// Without `keys` there is one cell: the population count of `start`
    /// and of its intersection with each plane.
    ///
    /// Every bitmap must be as long as `start`.
    fn grouped_counts / grouped_counts_in(
        start: &[u64],
        keys: &[KeyBits<'_>],
        planes: &[&[u64]],
        out: &mut [u64]
    ) = grouped_counts_impl
}

kernel! {
    /// The rows of `present` whose offset lies in `lo..=hi`, from the
    /// offsets' bit planes (`planes[b]` holds bit `b` of every row's
    /// offset; every present offset, `lo` and `hi` are below
    /// `2^planes.len()`): two bit-sliced comparisons, most significant
    /// bit first, a block of words at a time. Pass `hi = 2^planes.len() -
    /// 1` (or `lo = 0`) when a side holds for every present row.
    fn planes_in_range / planes_in_range_in(
        planes: &[Vec<u64>],
        present: &[u64],
        lo: u64,
        hi: u64
    ) -> Vec<u64> = planes_in_range_impl
}

/// One GROUP BY column, as bitmaps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyBits<'a> {
    /// For each valid key, in key order, the rows holding it.
    pub(crate) eq: &'a [Vec<u64>],
    /// The rows where the column is not missing (the missing key's rows
    /// are the others).
    pub(crate) present: &'a [u64],
}

impl KeyBits<'_> {
    /// The number of keys, the missing key included.
    fn keys(&self) -> usize {
        self.eq.len() + 1
    }

    /// Key `key`'s bitmap and the mask to XOR it with: the missing key
    /// (the last) is the complement of `present`.
    fn key(&self, key: usize) -> (&[u64], u64) {
        match self.eq.get(key) {
            Some(bits) => (bits, 0),
            None => (self.present, u64::MAX),
        }
    }
}

/// The number of set bits of `a`.
#[inline(always)]
fn popcount_impl(a: &[u64]) -> u64 {
    a.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// The number of bits set in both `a` and `b`.
#[inline(always)]
fn popcount_and_impl(a: &[u64], b: &[u64]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| u64::from((x & y).count_ones()))
        .sum()
}

/// `a ∧ (b ⊕ flip)`, counted: the rows of `a` in a key (`flip` 0) or
/// outside it (`flip` all ones).
#[inline(always)]
fn popcount_and_key(a: &[u64], b: &[u64], flip: u64) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| u64::from((x & (y ^ flip)).count_ones()))
        .sum()
}

/// `dst = a ∧ (b ⊕ flip)`.
#[inline(always)]
fn and_key(dst: &mut [u64], a: &[u64], b: &[u64], flip: u64) {
    for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
        *d = x & (y ^ flip);
    }
}

/// Words per block of [`grouped_counts`]: 4 KB per operand.
const BLOCK: usize = 512;

#[inline(always)]
fn grouped_counts_impl(start: &[u64], keys: &[KeyBits<'_>], planes: &[&[u64]], out: &mut [u64]) {
    let stride = 1 + planes.len();
    let depth = keys.len();
    // The cells' rows are start ∩ key₁ ∩ … ∩ key_depth. `prefix` holds, a
    // block at a time, the intersections down to each level but the last
    // (level `l` at `l * BLOCK`), for the current digits; the last level
    // is counted as it is intersected, or kept in `rows` when planes need
    // it too.
    let mut prefix = vec![0u64; depth.saturating_sub(1) * BLOCK];
    let mut rows = vec![0u64; if planes.is_empty() { 0 } else { BLOCK }];
    let mut digits = vec![0usize; depth];
    let mut lo = 0;
    while lo < start.len() {
        let hi = (lo + BLOCK).min(start.len());
        let n = hi - lo;
        digits.fill(0);
        refill(&mut prefix, &start[lo..hi], keys, &digits, 0, lo);
        let mut cell = 0;
        loop {
            let above = match depth {
                0 | 1 => &start[lo..hi],
                _ => &prefix[(depth - 2) * BLOCK..][..n],
            };
            let o = &mut out[cell * stride..][..stride];
            let cell_rows = match keys.last() {
                None => above,
                Some(last) => {
                    let (bits, flip) = last.key(digits[depth - 1]);
                    if planes.is_empty() {
                        o[0] += popcount_and_key(above, &bits[lo..hi], flip);
                        &[]
                    } else {
                        and_key(&mut rows[..n], above, &bits[lo..hi], flip);
                        &rows[..n]
                    }
                }
            };
            if depth == 0 || !planes.is_empty() {
                o[0] += popcount_impl(cell_rows);
                for (o, plane) in o[1..].iter_mut().zip(planes) {
                    *o += popcount_and_impl(cell_rows, &plane[lo..hi]);
                }
            }
            cell += 1;
            // Advance the odometer (last digit fastest); the block is done
            // when every digit wraps.
            let mut changed = None;
            for l in (0..depth).rev() {
                digits[l] += 1;
                if digits[l] < keys[l].keys() {
                    changed = Some(l);
                    break;
                }
                digits[l] = 0;
            }
            match changed {
                Some(l) => refill(&mut prefix, &start[lo..hi], keys, &digits, l, lo),
                None => break,
            }
        }
        lo = hi;
    }
}

#[inline(always)]
fn planes_in_range_impl(planes: &[Vec<u64>], present: &[u64], lo: u64, hi: u64) -> Vec<u64> {
    let top = (1u64 << planes.len()) - 1;
    let mut out = present.to_vec();
    // Per row: beyond the bound / still equal to it, in the bits seen so
    // far. A side whose bound is the first or last offset the planes can
    // hold passes every row and is skipped.
    let (mut beyond, mut equal) = ([0u64; BLOCK], [0u64; BLOCK]);
    for (at, block) in out.chunks_mut(BLOCK).enumerate() {
        let n = block.len();
        for (bound, at_least) in [(lo, true), (hi, false)] {
            if bound == if at_least { 0 } else { top } {
                continue;
            }
            beyond[..n].fill(0);
            equal[..n].fill(u64::MAX);
            for (b, plane) in planes.iter().enumerate().rev() {
                let plane = &plane[at * BLOCK..][..n];
                // All ones where the bound's bit `b` is set.
                let m = 0u64.wrapping_sub((bound >> b) & 1);
                // Above the bound where its bit is 0 and the row's is 1,
                // below it where its bit is 1 and the row's is 0.
                let (seek, flip) = if at_least { (!m, 0) } else { (m, u64::MAX) };
                for ((e, q), &x) in beyond[..n].iter_mut().zip(&mut equal[..n]).zip(plane) {
                    *e |= *q & (x ^ flip) & seek;
                    *q &= !(x ^ m);
                }
            }
            for ((o, e), q) in block.iter_mut().zip(&beyond[..n]).zip(&equal[..n]) {
                *o &= e | q;
            }
        }
    }
    out
}

/// Recomputes the materialised prefix levels `from..depth - 1` of
/// [`grouped_counts_impl`] for the block of `start` beginning at word
/// `lo`.
#[inline(always)]
fn refill(
    prefix: &mut [u64],
    start: &[u64],
    keys: &[KeyBits<'_>],
    digits: &[usize],
    from: usize,
    lo: usize,
) {
    let n = start.len();
    for l in from..keys.len().saturating_sub(1) {
        let (above, here) = prefix.split_at_mut(l * BLOCK);
        let a = if l == 0 {
            start
        } else {
            &above[(l - 1) * BLOCK..][..n]
        };
        let (bits, flip) = keys[l].key(digits[l]);
        and_key(&mut here[..n], a, &bits[lo..lo + n], flip);
    }
}

/// The number of GROUP BY cells [`grouped_counts`] visits with these key
/// counts, and the word operations it spends per word of rows (one per
/// prefix intersection, one count per cell and plane): the cost model
/// that picks it over the row-at-a-time path.
pub(crate) fn grouped_cost(key_counts: &[usize], planes: usize) -> usize {
    let mut cells = 1usize;
    let mut ops = 0usize;
    for &k in key_counts {
        cells = cells.saturating_mul(k);
        ops = ops.saturating_add(cells);
    }
    ops.saturating_add(cells.saturating_mul(1 + planes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_bits(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, density: f64) -> Vec<u64> {
        let mut bits = vec![0u64; rows.div_ceil(64)];
        for i in 0..rows {
            if rng.random_bool(density) {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        bits
    }

    fn plain_count(bits: &[u64]) -> u64 {
        let mut n = 0;
        for w in bits {
            for j in 0..64 {
                n += (w >> j) & 1;
            }
        }
        n
    }

    /// Without keys, every supported tier counts the bits of `start` and
    /// of its intersection with each plane like a bit-by-bit loop, for
    /// empty, partial-word and multi-block lengths and every density.
    #[test]
    fn popcounts_agree_across_tiers_and_lengths() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert!(Tier::supported().contains(&Tier::best()));
        for rows in [0, 1, 63, 64, 65, 130, 1000, 64 * BLOCK + 7] {
            for density in [0.0, 0.3, 1.0] {
                let a = random_bits(&mut rng, rows, density);
                let b = random_bits(&mut rng, rows, 0.5);
                let both: Vec<u64> = a.iter().zip(&b).map(|(x, y)| x & y).collect();
                let expected = vec![plain_count(&a), plain_count(&both)];
                for tier in Tier::supported() {
                    let mut out = vec![0; 2];
                    grouped_counts_in(tier, &a, &[], &[&b], &mut out);
                    assert_eq!(out, expected, "{tier:?}, {rows} rows");
                }
                let mut out = vec![0; 1];
                grouped_counts(&a, &[], &[], &mut out);
                assert_eq!(out[0], expected[0]);
            }
        }
    }

    /// Grouped counts and plane counts equal a row-at-a-time tally, for
    /// zero to three group columns, missing keys, several blocks and
    /// partial last words, in every supported tier.
    #[test]
    fn grouped_counts_equal_a_row_at_a_time_tally() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for rows in [0, 1, 77, 64 * BLOCK, 64 * BLOCK * 2 + 45] {
            for sizes in [vec![], vec![1], vec![2, 9], vec![3, 1, 4]] {
                // Key of each row per column: a valid key or `size` (missing).
                let codes: Vec<Vec<usize>> = sizes
                    .iter()
                    .map(|&s| (0..rows).map(|_| rng.random_range(0..=s)).collect())
                    .collect();
                let bitmap = |f: &dyn Fn(usize) -> bool| {
                    let mut b = vec![0u64; rows.div_ceil(64)];
                    for i in (0..rows).filter(|&i| f(i)) {
                        b[i / 64] |= 1 << (i % 64);
                    }
                    b
                };
                let eqs: Vec<Vec<Vec<u64>>> = sizes
                    .iter()
                    .zip(&codes)
                    .map(|(&s, c)| (0..s).map(|k| bitmap(&|i| c[i] == k)).collect())
                    .collect();
                let presents: Vec<Vec<u64>> = sizes
                    .iter()
                    .zip(&codes)
                    .map(|(&s, c)| bitmap(&|i| c[i] != s))
                    .collect();
                let keys: Vec<KeyBits> = eqs
                    .iter()
                    .zip(&presents)
                    .map(|(eq, present)| KeyBits { eq, present })
                    .collect();
                let start = random_bits(&mut rng, rows, 0.6);
                let values: Vec<u64> = (0..rows).map(|_| rng.random_range(0..8)).collect();
                let planes: Vec<Vec<u64>> = (0..3)
                    .map(|b| bitmap(&|i| (values[i] >> b) & 1 == 1))
                    .collect();
                let plane_refs: Vec<&[u64]> = planes.iter().map(Vec::as_slice).collect();
                let cells: usize = sizes.iter().map(|s| s + 1).product();
                let mut expected = vec![0u64; cells * 4];
                for i in (0..rows).filter(|&i| start[i / 64] >> (i % 64) & 1 == 1) {
                    let cell = sizes
                        .iter()
                        .zip(&codes)
                        .fold(0, |cell, (&s, c)| cell * (s + 1) + c[i]);
                    expected[cell * 4] += 1;
                    for b in 0..3 {
                        expected[cell * 4 + 1 + b] += (values[i] >> b) & 1;
                    }
                }
                for tier in Tier::supported() {
                    let mut out = vec![0u64; cells * 4];
                    grouped_counts_in(tier, &start, &keys, &plane_refs, &mut out);
                    assert_eq!(out, expected, "{tier:?}, {rows} rows, sizes {sizes:?}");
                    let mut counts = vec![0u64; cells];
                    grouped_counts_in(tier, &start, &keys, &[], &mut counts);
                    let only: Vec<u64> = expected.iter().step_by(4).copied().collect();
                    assert_eq!(counts, only, "{tier:?}, {rows} rows, sizes {sizes:?}");
                }
            }
        }
    }

    /// Bit-sliced range tests select the present rows whose offset is in
    /// range, for every range of a small span, around word and block
    /// boundaries, in every supported tier.
    #[test]
    fn planes_in_range_equals_a_comparison_per_row() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (rows, span) in [(0, 5u64), (1, 1), (70, 2), (1000, 24), (64 * BLOCK + 3, 11)] {
            let offsets: Vec<u64> = (0..rows).map(|_| rng.random_range(0..=span)).collect();
            let bitmap = |f: &dyn Fn(u64) -> bool| {
                let mut b = vec![0u64; rows.div_ceil(64)];
                for (i, &o) in offsets.iter().enumerate() {
                    if f(o) {
                        b[i / 64] |= 1 << (i % 64);
                    }
                }
                b
            };
            let width = u64::BITS - (span - 1).leading_zeros();
            let planes: Vec<Vec<u64>> =
                (0..width).map(|b| bitmap(&|o| (o >> b) & 1 == 1)).collect();
            let present = bitmap(&|o| o != span);
            let top = (1 << width) - 1;
            for lo in 0..span {
                for hi in lo..span {
                    let expected = bitmap(&|o| o != span && (lo..=hi).contains(&o));
                    // The last valid offset and the planes' largest one
                    // bound the present rows alike.
                    let tops = if hi == span - 1 {
                        vec![hi, top]
                    } else {
                        vec![hi]
                    };
                    for tier in Tier::supported() {
                        for &hi in &tops {
                            assert_eq!(
                                planes_in_range_in(tier, &planes, &present, lo, hi),
                                expected,
                                "{tier:?}, {rows} rows, {lo}..={hi} of {span}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn grouped_cost_counts_prefixes_and_cells() {
        assert_eq!(grouped_cost(&[], 0), 1);
        assert_eq!(grouped_cost(&[4, 10], 0), 4 + 40 + 40);
        assert_eq!(grouped_cost(&[21], 7), 21 + 21 * 8);
    }
}
