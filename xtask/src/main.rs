//! `cargo xtask`: the project's own automation (CI, benchmarks, firmware builds).

mod bench;
mod firmware;
mod prereq;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("prereq") => prereq::ensure(),
        Some("firmware") => firmware::firmware(&args[1..]),
        Some("flash") => firmware::flash(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        _ => {
            eprintln!("usage: cargo xtask <ci|prereq|firmware|flash|bench>");
            eprintln!(
                "  ci    fmt check, clippy, no_std builds of core and runtime, all tests, firmware"
            );
            eprintln!("  prereq   install what ci needs and a fresh machine lacks");
            eprintln!(
                "  firmware --chip esp32c3|esp32c6   build, clippy, app image, checks, size report"
            );
            eprintln!(
                "  flash --chip CHIP [--port PORT] [--monitor]   flash with the partition table"
            );
            eprintln!("  bench pipeline|fleet   benchmarks (see xtask/src/bench.rs)");
            bail!("unknown or missing task")
        }
    }
}

/// The workspace root: the nearest directory at or above the one `cargo
/// xtask` runs in that holds this workspace (`Cargo.toml` beside `xtask/`),
/// so a moved or freshly cloned checkout is found without rebuilding;
/// failing that, where xtask was built from.
pub(crate) fn root() -> PathBuf {
    let is_root = |d: &Path| d.join("Cargo.toml").is_file() && d.join("xtask/Cargo.toml").is_file();
    std::env::current_dir()
        .ok()
        .and_then(|cwd| cwd.ancestors().find(|d| is_root(d)).map(Path::to_path_buf))
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("xtask has a parent")
                .to_path_buf()
        })
}

/// Runs a command in `dir`, echoing it, failing on a non-zero exit.
fn run(dir: &Path, program: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Prints the free space where the build writes, so a run that fills the
/// disk says so before the compiler's "No space left on device".
fn disk_report(root: &Path) {
    eprintln!("$ df -h {}", root.display());
    // Informational only: a machine without df still runs CI.
    let _ = Command::new("df").arg("-h").arg(root).status();
}

/// Set (to anything) by `.ci/run`: a CI machine keeps nothing between runs
/// and its free disk varies, so `ci` deletes the firmware's build once the
/// firmware is checked. A developer's `cargo xtask ci` keeps it.
const SPARE_DISK: &str = "MQOTA_CI_SPARE_DISK";

fn ci() -> Result<()> {
    let root = root();
    prereq::ensure()?;
    disk_report(&root);
    run(&root, "cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        &root,
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    run(
        &root,
        "cargo",
        &[
            "build",
            "-p",
            "mqota-core",
            "--target",
            "riscv32imc-unknown-none-elf",
        ],
    )?;
    run(
        &root,
        "cargo",
        &[
            "build",
            "-p",
            "mqota-runtime",
            "--target",
            "riscv32imc-unknown-none-elf",
        ],
    )?;
    // The fuzz targets are their own workspace (cargo-fuzz builds them with
    // nightly and sanitizers); checking them here on stable keeps them
    // compiling against the core's API between fuzzing runs.
    run(
        &root,
        "cargo",
        &["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"],
    )?;
    run(
        &root,
        "cargo",
        &[
            "check",
            "--manifest-path",
            "fuzz/Cargo.toml",
            "--bins",
            "--target-dir",
            "target",
        ],
    )?;
    // The real firmware for both RISC-V chips: release build, clippy, image,
    // esptool check, slot fit and size report (see firmware/README.md). It
    // comes before the host tests so that, where CI asks to spare the disk,
    // its ~2 GB build is gone before the host's test binaries are linked.
    for chip in ["esp32c3", "esp32c6"] {
        firmware::firmware(&["--chip".to_string(), chip.to_string()])?;
    }
    if std::env::var_os(SPARE_DISK).is_some() {
        disk_report(&root);
        // The image, its size report and baseline stay in target/firmware.
        run(&root.join("firmware"), "cargo", &["clean"])?;
    }
    run(&root, "cargo", &["test", "--workspace"])?;
    // The power-cut sweep over a whole update and over a failed trial, with
    // both bootloader builds; exits non-zero on any bricked, wrong or
    // unfinishable run.
    for bootloader in ["stock", "rollback"] {
        for scenario in ["update", "failed-trial"] {
            run(
                &root,
                "cargo",
                &[
                    "run",
                    "--quiet",
                    "-p",
                    "mqota",
                    "--",
                    "sim",
                    "power-cut-sweep",
                    "--bootloader",
                    bootloader,
                    "--scenario",
                    scenario,
                ],
            )?;
        }
    }
    disk_report(&root);
    Ok(())
}
