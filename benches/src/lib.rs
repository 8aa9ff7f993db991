//! Criterion benches of the serial I/O hot path live in `benches/benches/`.
