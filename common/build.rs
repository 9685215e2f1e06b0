//! Links libtorch (see `build/libtorch_link.rs`), builds the C++ shims in `shim/` against
//! the headers of the same torch wheel: `store.cpp` (c10d's TCPStore for data-parallel
//! runs), `rng.cpp` (the random generators' state), `grad_hook.cpp` (post-accumulate
//! gradient hooks, for the overlapped exchange), `cuda_graph.cpp` and `nccl.cpp`
//! (ProcessGroupNCCL, when NCCL's header is there too). A libtorch without CUDA (or without
//! the CUDA runtime headers beside it) builds without the shim: decoding is then eager
//! everywhere, and `cfg(cuda_graphs)` is unset.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

include!("../build/libtorch_link.rs");

/// `build.compile(name)` with its archive kept in `target/<profile>/build/rlhf-shim-cache`
/// under a hash of what goes into it (the shim sources and this file, which holds the
/// flags; the include directories, cargo's compiler settings and the libtorch it is built
/// against). Cargo runs this
/// build script twice on a clean tree, once for `cargo clippy` and once for the build (a
/// workspace member's build hashes differ by clippy's wrapper); the second run links the
/// first run's archive instead of compiling the C++ again (90 s on 2 cores).
fn compile_cached(build: &cc::Build, name: &str, key_parts: &[&dyn std::fmt::Debug]) {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    // This file too: it holds the flags.
    let mut sources: Vec<PathBuf> = std::fs::read_dir("shim")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    sources.push("build.rs".into());
    sources.sort();
    for file in &sources {
        file.hash(&mut h);
        std::fs::read(file).unwrap_or_default().hash(&mut h);
    }
    for part in key_parts {
        format!("{part:?}").hash(&mut h);
    }
    for var in [
        "TARGET",
        "OPT_LEVEL",
        "DEBUG",
        "CXX",
        "CXXFLAGS",
        "CRATE_CC_NO_DEFAULTS",
    ] {
        std::env::var(var).ok().hash(&mut h);
    }
    let cache = out
        .ancestors()
        .nth(2)
        .map(|build_dir| build_dir.join("rlhf-shim-cache"));
    let Some(cache) = cache else {
        build.compile(name);
        return;
    };
    let kept = cache.join(format!("lib{name}-{:016x}.a", h.finish()));
    let archive = out.join(format!("lib{name}.a"));
    if kept.exists() && std::fs::copy(&kept, &archive).is_ok() {
        // What cc prints for a C++ archive.
        println!("cargo:rustc-link-lib=static={name}");
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=stdc++");
        return;
    }
    build.compile(name);
    // Written under a temporary name, then renamed: a concurrent build never links half a
    // file. A failure only costs the next run a compile.
    let temp = cache.join(format!(".lib{name}-{}.tmp", std::process::id()));
    let _ = std::fs::create_dir_all(&cache)
        .and_then(|_| std::fs::copy(&archive, &temp))
        .and_then(|_| std::fs::rename(&temp, &kept));
}

/// What identifies the libtorch the shims are built against: its library's size and time.
fn libtorch_stamp(lib: &Path) -> Option<(u64, std::time::SystemTime)> {
    let meta = std::fs::metadata(lib.join("libtorch_cpu.so")).ok()?;
    Some((meta.len(), meta.modified().ok()?))
}

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
    let stamp = libtorch_stamp(&lib);
    let build = cc::Build::new()
        .cpp(true)
        .file("shim/store.cpp")
        .file("shim/rng.cpp")
        .file("shim/grad_hook.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .clone();
    compile_cached(&build, "rlhf_shim", &[&include, &stamp]);
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    let has_cuda =
        lib.join("libtorch_cuda.so").exists() && include.join("ATen/cuda/CUDAGraph.h").exists();
    let Some(cuda) = cuda_include(&lib).filter(|_| has_cuda) else {
        println!("cargo:warning=libtorch without CUDA or CUDA headers: no CUDA graphs");
        return;
    };
    let build = cc::Build::new()
        .cpp(true)
        .file("shim/cuda_graph.cpp")
        .include(&include)
        .include(&cuda)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .clone();
    compile_cached(&build, "rlhf_cuda_graph", &[&include, &cuda, &stamp]);
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
    let build = cc::Build::new()
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
        .clone();
    compile_cached(&build, "rlhf_nccl", &[&include, &cuda, &nccl, &stamp]);
    println!("cargo:rustc-cfg=nccl");
}

/// NCCL's header: the wheel's `nvidia/nccl/include`, or a system one.
fn nccl_include(torch_lib: &Path) -> Option<PathBuf> {
    let site = torch_lib.parent().and_then(Path::parent)?;
    [site.join("nvidia/nccl/include"), "/usr/include".into()]
        .into_iter()
        .find(|dir| dir.join("nccl.h").exists())
}
