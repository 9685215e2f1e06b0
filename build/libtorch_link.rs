// Shared by the build scripts of every crate that produces binaries or tests linking
// libtorch (`build/link.rs`, and `common/build.rs` which also builds the CUDA shim).
//
// rustc links with `--as-needed`, which drops `libtorch.so` (nothing references it
// directly) and with it libtorch's CUDA backend: CUDA would then silently never appear.
// We force `libtorch.so` in and set an rpath to the build-time libtorch, followed by the
// GPU machine's torch, so the binaries run from a plain shell with no LD_LIBRARY_PATH.
// Cargo applies `rustc-link-arg` only to the package that emits it, hence one shared
// function included by each crate's build script.

const GPU_MACHINE_TORCH_LIB: &str = "/opt/torch/.venv/lib/python3.12/site-packages/torch/lib";

fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys did not report its libtorch lib directory (DEP_TCH_LIBTORCH_LIB)");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}:{GPU_MACHINE_TORCH_LIB}");
    println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--pop-state");
}
