//! In `cuda` builds, compiles the device backend's kernels (`src/model/backend/ops/kernels.cu`) with
//! nvcc into one fat binary: machine code for Ampere (sm_80), Ada (sm_89) and Hopper
//! (sm_90), and PTX that newer GPUs compile when they load it. Other builds need no
//! CUDA toolkit and do nothing here.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/model/backend/ops/kernels.cu");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_89,code=sm_89",
            "-gencode=arch=compute_90,code=[sm_90,compute_90]",
            "-o",
        ])
        .arg(out.join("ops.fatbin"))
        .arg("src/model/backend/ops/kernels.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (the `cuda` feature needs nvcc): {e}"));
    assert!(
        status.success(),
        "{nvcc} failed on src/model/backend/ops/kernels.cu"
    );
}
