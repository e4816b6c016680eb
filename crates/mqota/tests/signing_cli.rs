//! `mqota keys` and `mqota image sign|verify|info` against espsecure (the
//! vendor's Secure Boot V2 tool): each side's keys, digests and signed images
//! must be accepted by the other. RSA-3072 and ECDSA P-256.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mqota(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mqota"))
        .args(args)
        .output()
        .expect("run mqota")
}

fn espsecure(args: &[&str]) -> Output {
    Command::new("espsecure")
        .args(args)
        .output()
        .expect("espsecure is installed (pip install esptool)")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn image(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/images")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// `espsecure digest-sbv2-public-key` in hex.
fn espsecure_digest(dir: &Path, key: &str) -> String {
    let out = p(dir, "digest.bin");
    ok(espsecure(&[
        "digest-sbv2-public-key",
        "--keyfile",
        key,
        "--output",
        &out,
    ]));
    hex::encode(std::fs::read(&out).unwrap())
}

fn mqota_digest(key: &str) -> String {
    ok(mqota(&["keys", "digest", key])).trim().to_owned()
}

/// The (scheme argument, chip image) pairs: ECDSA on the C6, which checks it.
const CASES: [(&str, &str); 2] = [
    ("rsa3072", "sample-esp32c3.bin"),
    ("ecdsa-p256", "esp32c6-espflash.bin"),
];

#[test]
fn keys_made_by_mqota_are_private_to_their_owner_and_digest_like_espsecure() {
    let dir = tempfile::tempdir().unwrap();
    for (scheme, _) in CASES {
        let key = p(dir.path(), &format!("{scheme}.pem"));
        let out = ok(mqota(&["keys", "new", "--scheme", scheme, "-o", &key]));
        let private = std::fs::read_to_string(&key).unwrap();
        assert!(private.contains("PRIVATE KEY"));
        for line in private.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!out.contains(line), "the private key is never printed");
        }
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let public = p(dir.path(), &format!("{scheme}.pub.pem"));
        let want = espsecure_digest(dir.path(), &key);
        assert_eq!(mqota_digest(&key), want);
        assert_eq!(mqota_digest(&public), want);
        assert!(out.contains(&want), "{out}");
        // An existing key is never overwritten.
        assert!(!mqota(&["keys", "new", "--scheme", scheme, "-o", &key])
            .status
            .success());
    }
}

#[test]
fn an_image_signed_by_mqota_verifies_with_espsecure() {
    let dir = tempfile::tempdir().unwrap();
    for (scheme, img) in CASES {
        let key = p(dir.path(), &format!("{scheme}.pem"));
        ok(mqota(&["keys", "new", "--scheme", scheme, "-o", &key]));
        let signed = p(dir.path(), &format!("{scheme}.signed.bin"));
        ok(mqota(&[
            "image",
            "sign",
            "--key",
            &key,
            &image(img),
            "-o",
            &signed,
        ]));
        let out = ok(espsecure(&[
            "verify-signature",
            "--version",
            "2",
            "--keyfile",
            &key,
            &signed,
        ]));
        assert!(out.contains("verification successful"), "{out}");
        ok(mqota(&["image", "verify", "--key", &key, &signed]));
    }
}

#[test]
fn an_image_signed_by_espsecure_verifies_with_mqota_trusting_the_espsecure_digest() {
    let dir = tempfile::tempdir().unwrap();
    for (scheme, img) in [("rsa3072", CASES[0].1), ("ecdsa256", CASES[1].1)] {
        let key = p(dir.path(), &format!("{scheme}.pem"));
        ok(espsecure(&[
            "generate-signing-key",
            "--version",
            "2",
            "--scheme",
            scheme,
            &key,
        ]));
        let signed = p(dir.path(), &format!("{scheme}.signed.bin"));
        ok(espsecure(&[
            "sign-data",
            "--version",
            "2",
            "--keyfile",
            &key,
            "--output",
            &signed,
            &image(img),
        ]));
        let digest = espsecure_digest(dir.path(), &key);
        assert_eq!(mqota_digest(&key), digest);
        ok(mqota(&["image", "verify", "--trust", &digest, &signed]));
        let info: serde_json::Value =
            serde_json::from_str(&ok(mqota(&["image", "info", "--json", &signed]))).unwrap();
        assert_eq!(info["signatures"][0]["key_digest"], digest.as_str());
        assert_eq!(info["signatures"][0]["valid"], true);
    }
}

#[test]
fn signing_twice_rotates_and_each_key_alone_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (p(dir.path(), "old.pem"), p(dir.path(), "new.pem"));
    ok(mqota(&["keys", "new", "--scheme", "rsa3072", "-o", &old]));
    ok(mqota(&["keys", "new", "--scheme", "rsa3072", "-o", &new]));
    let once = p(dir.path(), "once.bin");
    let twice = p(dir.path(), "twice.bin");
    ok(mqota(&[
        "image",
        "sign",
        "--key",
        &old,
        &image(CASES[0].1),
        "-o",
        &once,
    ]));
    ok(mqota(&[
        "image", "sign", "--key", &new, &once, "-o", &twice,
    ]));
    for key in [&old, &new] {
        ok(mqota(&["image", "verify", "--key", key, &twice]));
        let out = ok(espsecure(&[
            "verify-signature",
            "--version",
            "2",
            "--keyfile",
            key,
            &twice,
        ]));
        assert!(out.contains("verification successful"), "{out}");
    }
    let text = ok(mqota(&["image", "info", &twice]));
    assert_eq!(text.matches("rsa3072 key").count(), 2, "{text}");
}

#[test]
fn verify_names_the_reason_of_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let key = p(dir.path(), "k.pem");
    let other = p(dir.path(), "o.pem");
    ok(mqota(&["keys", "new", "--scheme", "rsa3072", "-o", &key]));
    ok(mqota(&[
        "keys",
        "new",
        "--scheme",
        "ecdsa-p256",
        "-o",
        &other,
    ]));
    let signed = p(dir.path(), "s.bin");
    ok(mqota(&[
        "image",
        "sign",
        "--key",
        &key,
        &image(CASES[0].1),
        "-o",
        &signed,
    ]));
    let refusal = |args: &[&str]| {
        let out = mqota(args);
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(refusal(&["image", "verify", "--key", &other, &signed]).contains("unknown key"));
    assert!(
        refusal(&["image", "verify", "--key", &key, &image(CASES[0].1)]).contains("no signature")
    );
    let mut bytes = std::fs::read(&signed).unwrap();
    bytes[100] ^= 1;
    let flipped = p(dir.path(), "flipped.bin");
    std::fs::write(&flipped, &bytes).unwrap();
    assert!(refusal(&["image", "verify", "--key", &key, &flipped])
        .contains("signature does not verify"));
}

#[test]
fn an_ed25519_key_is_made_but_refused_for_image_signing() {
    let dir = tempfile::tempdir().unwrap();
    let key = p(dir.path(), "ed.pem");
    ok(mqota(&["keys", "new", "--scheme", "ed25519", "-o", &key]));
    assert_eq!(
        mqota_digest(&key),
        mqota_digest(&p(dir.path(), "ed.pub.pem"))
    );
    let out = mqota(&[
        "image",
        "sign",
        "--key",
        &key,
        &image(CASES[0].1),
        "-o",
        &p(dir.path(), "x"),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Ed25519"));
    assert!(!PathBuf::from(p(dir.path(), "x")).exists());
}
