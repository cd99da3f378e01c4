//! Build script:
//! - with the `cuda` feature, compiles `kernels/*.cu` to PTX in `OUT_DIR` (embedded by
//!   `src/backend/cuda.rs` with `include_str!`);
//! - with the `emulation` feature, compiles the same `kernels/*.cu`, unchanged, for the host with
//!   the system C++ compiler (C++17; `CXX` to choose it), through the shim in `emulation/`
//!   (`emulation/kernels.cpp` includes them; `src/backend/emulated` drives them).
//!
//! Without either it does nothing and needs neither a CUDA toolkit nor a C++ compiler.
//!
//! The PTX is built the way candle-kernels builds its own, with the `cudaforge` crate, so the same
//! environment configures both: `NVCC` (else `nvcc` on `PATH`, else `CUDA_HOME`/`CUDA_PATH`),
//! `CUDA_COMPUTE_CAP` (else `nvidia-smi`; 90 and above target the `a` variant, e.g. `sm_90a`),
//! `NVCC_CCBIN`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // `cfg(feature = "cuda")` compiles the nvcc driver (and its build-dependency) in at all;
    // CARGO_FEATURE_CUDA is the feature of the build being run, as candle-kernels reads it.
    #[cfg(feature = "cuda")]
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda::build_ptx();
    }
    #[cfg(feature = "emulation")]
    if std::env::var_os("CARGO_FEATURE_EMULATION").is_some() {
        emulation::build();
    }
}

#[cfg(feature = "emulation")]
mod emulation {
    pub(super) fn build() {
        println!("cargo:rerun-if-changed=kernels");
        println!("cargo:rerun-if-changed=emulation");
        cc::Build::new()
            .cpp(true)
            .std("c++17")
            .include("emulation/include")
            .include("kernels")
            .file("emulation/runtime.cpp")
            .file("emulation/kernels.cpp")
            // The kernels must run fast even in debug builds of the crate.
            .opt_level(2)
            // The kernels read floats through `uint4`; each float operation is one IEEE
            // operation, as on the GPU (the kernels spell out their fused multiply-adds).
            .flag("-fno-strict-aliasing")
            .flag("-ffp-contract=off")
            .flag_if_supported("-Wno-unknown-pragmas")
            .flag("-fno-exceptions")
            .warnings(true)
            .compile("candle_grad_clip_emulation");
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    pub(super) fn build_ptx() {
        println!("cargo:rerun-if-changed=kernels");
        for var in [
            "NVCC",
            "CUDA_HOME",
            "CUDA_PATH",
            "CUDA_COMPUTE_CAP",
            "NVCC_CCBIN",
        ] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        // Emits rerun-if-changed for every kernel source itself.
        let result = cudaforge::KernelBuilder::new()
            .source_dir("kernels")
            .arg("--expt-relaxed-constexpr")
            .arg("-std=c++17")
            .arg("-O3")
            .build_ptx();
        if let Err(e) = result {
            panic!(
                "candle-grad-clip: compiling kernels/*.cu to PTX failed: {e}\n\
                 Set NVCC or CUDA_HOME to a CUDA toolkit, and CUDA_COMPUTE_CAP (e.g. 90) on a machine \
                 without a GPU."
            );
        }
    }
}
