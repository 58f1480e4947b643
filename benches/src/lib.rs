//! Criterion benchmarks of the bookie; the benchmarks themselves are in `benches/` (see README.md).
