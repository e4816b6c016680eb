//! Signing the commands the controller sends, for devices built with a job
//! key: each command gets `op`, `seq` and `device` and is wrapped in the
//! JWS envelope the device checks (`mqota_core::protocol::envelope`).
//!
//! # Sequence numbers that only grow
//!
//! A device refuses any command whose `seq` is not above the highest it has
//! accepted, so the controller must never go back, also across restarts and
//! with several controllers. A sequence number is the current time in
//! microseconds since 1970, or one more than the last number handed out if
//! that is higher (two commands in the same microsecond, or a clock that
//! went back). So that a restart after the clock went back cannot reuse
//! numbers, a high-water mark is kept in a file: numbers are handed out from
//! blocks of [`RESERVE`] reserved ahead in that file, written (and synced)
//! before the first number of the block is used. Two controllers sharing a
//! key get numbers from their own clocks: each device takes the highest,
//! and a command from a controller whose clock is far behind is refused
//! (`replayed`) rather than run out of order.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use mqota_core::protocol::envelope;
use mqota_core::protocol::TopicKind;
use p256::ecdsa::SigningKey;

/// How many sequence numbers are reserved in the file at a time (ten
/// seconds' worth of microseconds).
pub const RESERVE: u64 = 10_000_000;

/// Why a command could not be signed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// The high-water mark file could not be read or written.
    #[error("job sequence file {path}: {reason}")]
    SequenceFile {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Signs commands with a job key.
pub struct JobSigner {
    key: SigningKey,
    seq: Mutex<Sequencer>,
}

impl std::fmt::Debug for JobSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("JobSigner").finish_non_exhaustive()
    }
}

impl JobSigner {
    /// A signer with `key`, keeping its high-water mark in `seq_file`
    /// (created if missing, mode 0600).
    pub fn new(key: SigningKey, seq_file: &Path) -> Result<Self, SignerError> {
        Ok(Self {
            key,
            seq: Mutex::new(Sequencer::open(seq_file)?),
        })
    }

    /// The public key a device must trust.
    pub fn job_key(&self) -> envelope::JobKey {
        envelope::job_key_of(self.key.verifying_key())
    }

    /// `command` (a JSON object) for `device` on the topic `kind`, with
    /// `op`, `seq` and `device` added, signed. Returns the payload and the
    /// sequence number used.
    pub fn seal(
        &self,
        mut command: serde_json::Map<String, serde_json::Value>,
        kind: TopicKind,
        device: &str,
    ) -> Result<(Vec<u8>, u64), SignerError> {
        let seq = self.seq.lock().unwrap().next()?;
        command.insert("op".into(), kind.name().into());
        command.insert("seq".into(), seq.into());
        command.insert("device".into(), device.into());
        let json = serde_json::to_vec(&command).expect("a JSON object serialises");
        Ok((envelope::seal(&json, &self.key).into_bytes(), seq))
    }
}

struct Sequencer {
    next: u64,
    reserved: u64,
    path: PathBuf,
}

impl Sequencer {
    fn open(path: &Path) -> Result<Self, SignerError> {
        let err = |reason: String| SignerError::SequenceFile {
            path: path.display().to_string(),
            reason,
        };
        let mark = match std::fs::read_to_string(path) {
            Ok(text) => text
                .trim()
                .parse::<u64>()
                .map_err(|_| err("not a number: refusing to guess where to continue".into()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(err(e.to_string())),
        };
        Ok(Self {
            next: mark,
            reserved: mark,
            path: path.to_owned(),
        })
    }

    fn next(&mut self) -> Result<u64, SignerError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let n = now.max(self.next);
        if n >= self.reserved {
            let mark = n + RESERVE;
            write_mark(&self.path, mark).map_err(|e| SignerError::SequenceFile {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            })?;
            self.reserved = mark;
        }
        self.next = n + 1;
        Ok(n)
    }
}

fn write_mark(path: &Path, mark: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{mark}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqota_core::protocol::envelope::JobTrust;
    use mqota_core::protocol::{parse_signed_command, CommandOutcome, MAX_COMMAND_LEN};
    use mqota_core::signature::SoftVerifier;

    fn key() -> SigningKey {
        SigningKey::from_slice(&[9; 32]).unwrap()
    }

    #[test]
    fn sealed_commands_open_on_the_device_with_growing_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job-seq");
        let signer = JobSigner::new(key(), &file).unwrap();
        let trust = JobTrust::new(signer.job_key(), SoftVerifier::INSTANCE);
        let mut last = 0;
        for _ in 0..50 {
            let mut cmd = serde_json::Map::new();
            cmd.insert("job".into(), "j".into());
            let (payload, seq) = signer.seal(cmd, TopicKind::Cancel, "c3-1").unwrap();
            assert!(seq > last);
            last = seq;
            let mut inner = [0u8; MAX_COMMAND_LEN];
            let opened = envelope::open(&payload, &trust, &mut inner).unwrap();
            let (outcome, got) = parse_signed_command(TopicKind::Cancel, opened, "c3-1").unwrap();
            assert_eq!(got, seq);
            assert!(matches!(outcome, CommandOutcome::Command(_)));
        }
        // The mark on disk is ahead of every number handed out.
        let mark: u64 = std::fs::read_to_string(&file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(mark > last);
    }

    #[test]
    fn a_restart_continues_above_the_mark_even_if_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job-seq");
        // A mark far in the future: a clock that went back since.
        let future = u64::MAX / 2;
        std::fs::write(&file, format!("{future}\n")).unwrap();
        let signer = JobSigner::new(key(), &file).unwrap();
        let (_, seq) = signer
            .seal(serde_json::Map::new(), TopicKind::Start, "d")
            .unwrap();
        assert!(seq >= future);
        std::fs::write(&file, "garbage").unwrap();
        assert!(JobSigner::new(key(), &file).is_err());
    }
}
