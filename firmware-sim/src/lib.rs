//! firmware-sim
