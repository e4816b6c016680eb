//! What `cargo xtask ci` needs besides Rust, installed when missing, so that
//! the README's test command works on a fresh machine: the riscv32 targets,
//! rustfmt and clippy; Mosquitto and its command-line clients (the
//! integration tests start their own broker); esptool (golden-file checks);
//! paho-mqtt 2.x (a Python MQTT client at 3.1.1 and 5, a peer in the
//! embedded broker's tests); PyJWT and cryptography (an independent JOSE
//! implementation for the signed-command tests); Debian's Chromium and
//! ChromeDriver (the page's browser test); and what `cargo install espflash` needs to link (libudev, pkg-config).

use anyhow::{bail, Result};
use std::process::{Command, Stdio};

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn espflash_installed() -> bool {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    have("espflash") || std::path::Path::new(&home).join("bin/espflash").exists()
}

fn dpkg_has(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs as root directly, otherwise through sudo.
fn privileged(args: &[&str]) -> Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let (program, rest): (&str, Vec<&str>) = if root {
        (args[0], args[1..].to_vec())
    } else {
        ("sudo", args.to_vec())
    };
    super::run(&super::root(), program, &rest)
}

/// Installs what is missing; says what it does.
pub fn ensure() -> Result<()> {
    let root = super::root();
    super::run(
        &root,
        "rustup",
        &[
            "target",
            "add",
            "riscv32imc-unknown-none-elf",
            "riscv32imac-unknown-none-elf",
        ],
    )?;
    super::run(&root, "rustup", &["component", "add", "rustfmt", "clippy"])?;

    let mut apt: Vec<&str> = Vec::new();
    if !have("mosquitto") && !std::path::Path::new("/usr/sbin/mosquitto").exists() {
        apt.push("mosquitto");
    }
    if !have("mosquitto_sub") || !have("mosquitto_pub") {
        apt.push("mosquitto-clients");
    }
    // The TLS tests check certificates with openssl and fetch over HTTPS
    // with curl (both usually on a Debian base image).
    if !have("openssl") {
        apt.push("openssl");
    }
    if !have("curl") {
        apt.push("curl");
    }
    if !have("chromium") {
        apt.push("chromium");
    }
    if !have("chromedriver") {
        apt.push("chromium-driver");
    }
    if !espflash_installed() {
        if !dpkg_has("libudev-dev") {
            apt.push("libudev-dev");
        }
        if !have("pkg-config") {
            apt.push("pkg-config");
        }
    }
    if !apt.is_empty() {
        if !have("apt-get") {
            bail!(
                "missing {}: install them with your package manager",
                apt.join(", ")
            );
        }
        eprintln!("installing {}", apt.join(" "));
        privileged(&["apt-get", "update", "-qq"])?;
        let mut args = vec!["apt-get", "install", "-y", "-qq"];
        args.extend(&apt);
        privileged(&args)?;
    }
    let paho = || {
        Command::new("python3")
            .args(["-c", "import paho.mqtt.client as m; m.CallbackAPIVersion"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !paho() {
        super::run(
            &root,
            "python3",
            &["-m", "pip", "install", "-q", "paho-mqtt>=2"],
        )?;
        if !paho() {
            bail!("paho-mqtt 2.x was installed but python3 cannot import it");
        }
    }
    // PyJWT: an independent JOSE implementation, signing and checking the
    // ES256 command envelopes in the e2e tests.
    let pyjwt = || {
        Command::new("python3")
            .args(["-c", "import jwt, cryptography; jwt.encode"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !pyjwt() {
        super::run(
            &root,
            "python3",
            &["-m", "pip", "install", "-q", "pyjwt>=2", "cryptography"],
        )?;
        if !pyjwt() {
            bail!("pyjwt and cryptography were installed but python3 cannot import them");
        }
    }
    if !have("esptool") {
        super::run(&root, "python3", &["-m", "pip", "install", "-q", "esptool"])?;
        if !have("esptool") {
            bail!("esptool was installed but is not on PATH (add pip's bin directory)");
        }
    }
    Ok(())
}
