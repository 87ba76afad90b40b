//! Compiles the emulator's scheduler and the worker's CUDA kernels (the same source
//! nvcc compiles in `cuda` builds) as host C++ against `include/cuda_emu.h`.

fn main() {
    let kernels_dir = "../worker/src/model/backend/ops";
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
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .include("include")
        .include(kernels_dir)
        // IEEE arithmetic, unfused: what the kernels' explicit `_rn` operations ask for.
        .flag("-ffp-contract=off")
        .flag_if_supported("-fno-fast-math")
        // Fibers switch stacks with _longjmp, which a fortified build would refuse.
        .flag("-U_FORTIFY_SOURCE")
        .warnings(false)
        .file("src/emu.cpp")
        .file("src/kernels.cpp")
        .file("src/selftest.cpp")
        .compile("shardserve_cuda_emu");
}
