//! The build script of every crate that links libtorch into binaries or tests (see
//! `libtorch_link.rs`).

include!("libtorch_link.rs");

fn main() {
    link_libtorch();
}
