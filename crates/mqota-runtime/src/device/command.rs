//! Reading a command message: what the loop and a download both do with a
//! message on one of the device's topics before anything acts on it.

use mqota_core::fetch::{is_https, HTTPS_NOT_ENABLED};
use mqota_core::protocol::envelope::{self, JobTrust};
use mqota_core::protocol::{
    parse_command, parse_signed_command, BadCommand, Command, CommandOutcome, ErrorCode, Phase,
    Progress, Topics, MAX_COMMAND_LEN,
};

use crate::mqtt::Message;
use crate::trust::TrustState;

/// A message on one of the device's topics, read.
// Built and consumed at once, never stored: no allocator to box in.
#[allow(clippy::large_enum_variant)]
pub(super) enum Incoming {
    /// A command for this device, with its sequence number if it was signed
    /// (fresh: above every one accepted so far).
    Command(Command, Option<u64>),
    /// A malformed command: publish this refusal.
    Bad(Progress),
    /// Not a command for this device, or a retained one: nothing to do.
    Ignored,
}

/// Reads a message: a retained command is dropped unread (it would run again
/// on every reconnect), anything not addressed to this device is ignored.
/// With a job key, only a command signed with it, bound to this device and
/// topic, and with a fresh sequence number is a command; anything else is
/// refused (`bad_signature`, `replayed`).
pub(super) fn read_command(
    msg: &Message,
    topics: &Topics,
    job_trust: Option<&JobTrust>,
    state: &TrustState,
    tls: bool,
) -> Incoming {
    let Some(kind) = topics.classify(&msg.topic) else {
        return Incoming::Ignored;
    };
    if msg.retain {
        warn!("dropping a retained command: commands are never retained");
        return Incoming::Ignored;
    }
    let (parsed, seq) = match job_trust {
        None => (parse_command(kind, &msg.payload, topics.device_id()), None),
        Some(trust) => {
            let mut inner = [0u8; MAX_COMMAND_LEN];
            let opened = match envelope::open(&msg.payload, trust, &mut inner) {
                Ok(inner) => inner,
                Err(reason) => {
                    return Incoming::Bad(
                        BadCommand {
                            code: ErrorCode::BadSignature,
                            reason,
                            job: None,
                        }
                        .to_progress(topics),
                    )
                }
            };
            match parse_signed_command(kind, opened, topics.device_id()) {
                Ok((outcome, seq)) => (Ok(outcome), Some(seq)),
                Err(bad) => (Err(bad), None),
            }
        }
    };
    if let (Some(seq), Ok(CommandOutcome::Command(cmd))) = (seq, &parsed) {
        if !state.is_fresh(seq) {
            return Incoming::Bad(
                Progress::new(topics.device_id(), cmd.job(), Phase::Failed).with_error(
                    ErrorCode::Replayed,
                    Some("sequence number is not above the last one accepted"),
                ),
            );
        }
    }
    match parsed {
        // Refused before the engine sees it: the device could never fetch
        // it, and the controller can tell from `https` in the status.
        Ok(CommandOutcome::Command(Command::Start(job))) if !tls && is_https(&job.url) => {
            Incoming::Bad(
                Progress::new(topics.device_id(), job.job, Phase::Failed)
                    .with_error(ErrorCode::BadCommand, Some(HTTPS_NOT_ENABLED)),
            )
        }
        Ok(CommandOutcome::Command(cmd)) => Incoming::Command(cmd, seq),
        Ok(CommandOutcome::NotForMe) => Incoming::Ignored,
        Err(bad) => Incoming::Bad(bad.to_progress(topics)),
    }
}
