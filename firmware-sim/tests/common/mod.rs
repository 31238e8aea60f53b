//! Helpers shared by the tests that run the `firmware-sim` binary.

use std::process::Child;

/// The simulator binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_firmware-sim");

/// Kills the child if the test fails before it exits.
pub struct Running(pub Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
