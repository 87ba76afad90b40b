//! Compiles the emulator's scheduler and the worker's CUDA kernels (the same source
//! nvcc compiles in `cuda` builds) as host C++ against `include/cuda_emu.h`, with a
//! table of the kernels by name (what a GPU's module lookup gives), made from the
//! preprocessed source so that every kernel `kernels.cu` defines is in it.

use std::path::PathBuf;

fn build() -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .include("include")
        .include("../worker/src/model/backend/ops")
        // IEEE arithmetic, unfused: what the kernels' explicit `_rn` operations ask for.
        .flag("-ffp-contract=off")
        .flag_if_supported("-fno-fast-math")
        // Kernels read 16-byte vectors as their elements, as CUDA code does.
        .flag("-fno-strict-aliasing")
        // Fibers switch stacks with _longjmp, which a fortified build would refuse.
        .flag("-U_FORTIFY_SOURCE")
        .warnings(false);
    b
}

/// The names of the `extern "C" void` functions defined in preprocessed C++ source.
fn kernel_names(source: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    for (at, _) in source.match_indices("extern \"C\"") {
        let rest = source[at + "extern \"C\"".len()..].trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            continue;
        };
        let rest = rest.trim_start();
        let name = ident(rest);
        if !name.is_empty() && rest[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    names
}

fn main() {
    for path in [
        "src/emu.cpp",
        "src/kernels.cpp",
        "src/selftest.cpp",
        "include/cuda_emu.h",
        "include/cuda_fp16.h",
        "include/cuda_bf16.h",
        "../worker/src/model/backend/ops/kernels.cu",
    ] {
        println!("cargo::rerun-if-changed={path}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The kernels as the emulator compiles them, without the table being made.
    let expanded = build()
        .define("EMU_LISTING", None)
        .file("src/kernels.cpp")
        .expand();
    let names = kernel_names(&String::from_utf8_lossy(&expanded));
    assert!(!names.is_empty(), "no kernels found in kernels.cu");
    let table: String = names.iter().map(|n| format!("ENTRY({n})\n")).collect();
    std::fs::write(out.join("kernel_table.inc"), table).expect("OUT_DIR is writable");
    build()
        .include(&out)
        .file("src/emu.cpp")
        .file("src/kernels.cpp")
        .file("src/selftest.cpp")
        .compile("shardserve_cuda_emu");
}
