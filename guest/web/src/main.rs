//! gantry-guest-web (work in progress).
fn main() {}
