//! Links libtorch (see `build/libtorch_link.rs`), builds the C++ shims in `shim/` against
//! the headers of the same torch wheel: `store.cpp` (c10d's TCPStore for data-parallel
//! runs), `rng.cpp` (the random generators' state), `grad_hook.cpp` (post-accumulate
//! gradient hooks, for the overlapped exchange), `cuda_graph.cpp` and `nccl.cpp`
//! (ProcessGroupNCCL, when NCCL's header is there too). A libtorch without CUDA (or without
//! the CUDA runtime headers beside it) builds without the shim: decoding is then eager
//! everywhere, and `cfg(cuda_graphs)` is unset.

use std::path::{Path, PathBuf};

include!("../build/libtorch_link.rs");

/// The CUDA runtime headers from the wheel's `nvidia-*` packages (cu13: `nvidia/cu13/include`,
/// completed by `nvidia-cuda-crt`) or a CUDA toolkit.
fn cuda_include(torch_lib: &Path) -> Option<PathBuf> {
    let mut candidates = vec![];
    if let Some(site) = torch_lib.parent().and_then(Path::parent) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            candidates.extend(entries.flatten().map(|e| e.path().join("include")));
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            candidates.push(PathBuf::from(home).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .into_iter()
        .find(|dir| dir.join("crt/host_config.h").exists())
}

fn main() {
    link_libtorch();
    println!("cargo::rustc-check-cfg=cfg(cuda_graphs)");
    println!("cargo::rustc-check-cfg=cfg(nccl)");
    println!("cargo:rerun-if-changed=shim");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap());
    // The wheel's own path (.venv/libtorch is a link into site-packages), where nvidia/ is.
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    let include = lib.parent().unwrap().join("include");
    cc::Build::new()
        .cpp(true)
        .file("shim/store.cpp")
        .file("shim/rng.cpp")
        .file("shim/grad_hook.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("rlhf_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    let has_cuda =
        lib.join("libtorch_cuda.so").exists() && include.join("ATen/cuda/CUDAGraph.h").exists();
    let Some(cuda) = cuda_include(&lib).filter(|_| has_cuda) else {
        println!("cargo:warning=libtorch without CUDA or CUDA headers: no CUDA graphs");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("shim/cuda_graph.cpp")
        .include(&include)
        .include(&cuda)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("rlhf_cuda_graph");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=cuda_graphs");
    // ProcessGroupNCCL: its declarations need USE_C10D_NCCL and NCCL's header (the
    // wheel's nvidia-nccl package); libtorch_cuda holds its code.
    // CCCL's nv/target, which cuda_fp16.h includes (pip's nvidia-cuda-cccl).
    let cccl = cuda.join("nv/target").exists();
    let Some(nccl) = nccl_include(&lib).filter(|_| cccl) else {
        println!(
            "cargo:warning=no nccl.h or CCCL headers beside libtorch: data parallel on CUDA goes through the store"
        );
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("shim/nccl.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&cuda)
        .include(&nccl)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_NCCL", None)
        .warnings(false)
        .compile("rlhf_nccl");
    println!("cargo:rustc-cfg=nccl");
}

/// NCCL's header: the wheel's `nvidia/nccl/include`, or a system one.
fn nccl_include(torch_lib: &Path) -> Option<PathBuf> {
    let site = torch_lib.parent().and_then(Path::parent)?;
    [site.join("nvidia/nccl/include"), "/usr/include".into()]
        .into_iter()
        .find(|dir| dir.join("nccl.h").exists())
}
