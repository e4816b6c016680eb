//! The firmware directory: each regular file is read through the same image
//! validator the device runs, so the catalogue says what a device would
//! accept. [`Catalogue::scan`] reports every file (with an `error` for those
//! that are not valid images, so `serve` can say why it skips them); the API
//! lists and the firmware server serves only valid images.
//!
//! The directory is not trusted to hold only images:
//! - a file larger than [`MAX_UPLOAD`] is never read (it cannot be an image
//!   a device accepts), so a 1 GiB file costs a `stat`, not a gigabyte;
//! - a symbolic link counts only if it resolves to a regular file inside the
//!   directory, so `ln -s /etc/passwd fw/x.bin` is not served;
//! - results (metadata, never file contents) are cached by (size,
//!   modification time), at most [`MAX_CACHED`] of them, and a file found
//!   gone is forgotten at once: the firmware server answers `ETag` from the
//!   cached SHA-256 without hashing the file on every request.
//!
//! Resolution ([`resolve_firmware`], [`deployable`]) turns what an operator
//! names, a listed name or a URL, into the image a deployment installs.

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use mqota_core::image::validate_bytes;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod resolve;
pub use resolve::{
    deployable, deployable_named, resolve_firmware, resolve_firmware_as, FirmwareError,
};

/// One image of the catalogue: a file of the firmware directory as read
/// from it (or from the store's copy), and the same entry as the API lists
/// it (`GET /api/firmware`, with its `url`) and a deployment resolves it
/// ([`deployable`]).
///
/// Its JSON (see the `Serialize` impl) is the API's: `url` when known,
/// `valid` (for [`FirmwareEntry::is_valid`]), never `mtime`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FirmwareEntry {
    /// File name, also the last part of its URL.
    pub name: String,
    /// Where devices download it: set once a server lists it
    /// ([`FirmwareEntry::listed_under`]); `None` for a file read from the
    /// directory or the store.
    #[serde(default)]
    pub url: Option<String>,
    /// Chip of the image, e.g. `esp32c3`; `None` if not a valid image.
    pub chip: Option<String>,
    /// `project_name` of the app descriptor.
    pub project: Option<String>,
    /// `version` of the app descriptor.
    pub version: Option<String>,
    /// File size in bytes.
    pub size: u64,
    /// SHA-256 of the file, hex: what an OTA job carries.
    pub sha256: String,
    /// Why the file is not a valid image; `None` when it is.
    pub error: Option<String>,
    /// Key digests (hex, what a device trusts) of the Secure Boot V2
    /// signature blocks that verify against this image; empty: unsigned;
    /// `None`: not known (an entry read back from the store, or listed by
    /// an older server).
    #[serde(default)]
    pub signers: Option<Vec<String>>,
    /// Modification time, Unix seconds: with `size`, how the catalogue
    /// knows a file unchanged. Not in the JSON (0 for an entry read from it).
    #[serde(default)]
    pub mtime: i64,
}

impl Serialize for FirmwareEntry {
    /// `{name, url, chip, project, version, size, sha256, valid, error,
    /// signers}`, `url` only when known.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct as _;
        let mut out = s.serialize_struct("FirmwareEntry", 10)?;
        out.serialize_field("name", &self.name)?;
        match &self.url {
            Some(url) => out.serialize_field("url", url)?,
            None => out.skip_field("url")?,
        }
        out.serialize_field("chip", &self.chip)?;
        out.serialize_field("project", &self.project)?;
        out.serialize_field("version", &self.version)?;
        out.serialize_field("size", &self.size)?;
        out.serialize_field("sha256", &self.sha256)?;
        out.serialize_field("valid", &self.is_valid())?;
        out.serialize_field("error", &self.error)?;
        out.serialize_field("signers", &self.signers)?;
        out.end()
    }
}

impl FirmwareEntry {
    /// Reads and checks one image.
    pub fn from_bytes(name: &str, bytes: &[u8], mtime: i64) -> Self {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let mut e = FirmwareEntry {
            name: name.to_owned(),
            url: None,
            chip: None,
            project: None,
            version: None,
            size: bytes.len() as u64,
            sha256,
            error: None,
            signers: None,
            mtime,
        };
        match validate_bytes(bytes).and_then(|info| info.verify().map(|()| info)) {
            // A signed image carries its padding and signature sector: the
            // whole file goes to the device, which checks the signature.
            Ok(info) if info.file_len as usize == bytes.len() => {
                e.chip = Some(info.chip.to_string());
                e.project = Some(info.app.project_name.to_string());
                e.version = Some(info.app.version.to_string());
                e.signers = Some(signers(bytes, info.signature_sector()));
            }
            Ok(info) => {
                e.error = Some(format!(
                    "{} bytes after the end of the image (at {})",
                    bytes.len() - info.file_len as usize,
                    info.file_len
                ))
            }
            Err(err) => e.error = Some(format!("not a valid app image: {err}")),
        }
        e
    }

    /// Whether devices can be sent this file.
    pub fn is_valid(&self) -> bool {
        self.error.is_none()
    }

    /// This entry as a firmware server at `base` (e.g.
    /// `http://host:8080`, no trailing `/`) lists it: downloaded from
    /// `{base}/firmware/{name}`.
    pub fn listed_under(mut self, base: &str) -> Self {
        self.url = Some(format!("{base}/firmware/{}", self.name));
        self
    }
}

/// The key digests of the signature blocks after the image (its sector at
/// `sector`) whose CRC, image digest and signature are right, checked with
/// the key each block carries: who signed it, not whether a device trusts
/// that key.
fn signers(bytes: &[u8], sector: Option<u32>) -> Vec<String> {
    use mqota_core::signature::{self, SoftVerifier, SECTOR_LEN};
    let Some(at) = sector.map(|s| s as usize) else {
        return Vec::new();
    };
    let Some(sector) = bytes
        .get(at..at + SECTOR_LEN)
        .and_then(|s| <&[u8; SECTOR_LEN]>::try_from(s).ok())
    else {
        return Vec::new();
    };
    let digest: [u8; 32] = Sha256::digest(&bytes[..at]).into();
    signature::blocks(sector)
        .filter_map(Result::ok)
        .filter(|b| {
            b.crc_valid()
                && b.image_digest() == digest
                && b.signature_verifies(SoftVerifier::INSTANCE)
        })
        .map(|b| hex::encode(b.key_digest()))
        .collect()
}

/// A firmware directory and what was read from it.
#[derive(Debug)]
pub struct Catalogue {
    dir: PathBuf,
    cache: Mutex<HashMap<String, FirmwareEntry>>,
}

/// The most entries [`Catalogue`] remembers; past it, the cache is emptied
/// and refilled as files are asked for (an entry is a few hundred bytes, so
/// this bounds the cache at a few megabytes whatever the directory holds).
pub const MAX_CACHED: usize = 4096;

/// The longest name a served file may have: `NAME_MAX` of Linux file
/// systems. Longer names are no file of the directory (and the OS would
/// refuse to look them up).
pub const MAX_NAME_LEN: usize = 255;

/// A served file's name is one path component of ordinary characters, so a
/// request can never leave the directory.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'))
}

impl Catalogue {
    /// A catalogue of `dir` (read on the first [`Catalogue::scan`]).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            cache: Mutex::default(),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again (only new or changed files are hashed) and
    /// returns every entry, by name.
    pub fn scan(&self) -> std::io::Result<Vec<FirmwareEntry>> {
        let mut names = Vec::new();
        for ent in std::fs::read_dir(&self.dir)? {
            let ent = ent?;
            let Ok(name) = ent.file_name().into_string() else {
                continue;
            };
            let kind = ent.file_type()?;
            if is_plain_name(&name) && (kind.is_file() || kind.is_symlink()) {
                names.push(name);
            }
        }
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in &names {
            if let Some(e) = self.entry(name)? {
                out.push(e);
            }
        }
        self.cache
            .lock()
            .unwrap()
            .retain(|n, _| names.binary_search(n).is_ok());
        Ok(out)
    }

    /// The file `name` stands for, with its metadata: `None` when there is
    /// no such regular file, or when `name` is a symbolic link that leaves
    /// the directory (or points at anything but a regular file).
    pub fn resolve(&self, name: &str) -> std::io::Result<Option<(PathBuf, std::fs::Metadata)>> {
        if !is_plain_name(name) {
            return Ok(None);
        }
        let path = self.dir.join(name);
        let link = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if gone(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = if link.file_type().is_symlink() {
            // Followed only to a file that stays inside the directory (the
            // directory itself may be reached through links).
            let (target, dir) = match (path.canonicalize(), self.dir.canonicalize()) {
                (Ok(t), Ok(d)) => (t, d),
                (Err(e), _) | (_, Err(e)) if gone(&e) => return Ok(None),
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
            if target.parent() != Some(dir.as_path()) {
                return Ok(None);
            }
            target
        } else {
            path
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some((path, m))),
            Ok(_) => Ok(None),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One entry, read again if the file changed; `None` if there is no such
    /// file (see [`Catalogue::resolve`]).
    pub fn entry(&self, name: &str) -> std::io::Result<Option<FirmwareEntry>> {
        let Some((path, meta)) = self.resolve(name)? else {
            self.cache.lock().unwrap().remove(name);
            return Ok(None);
        };
        let mtime = mtime_of(&meta);
        if let Some(e) = self.cache.lock().unwrap().get(name) {
            if e.size == meta.len() && e.mtime == mtime {
                return Ok(Some(e.clone()));
            }
        }
        let e = if meta.len() > MAX_UPLOAD as u64 {
            // Not read at all: no image a device accepts is this large.
            FirmwareEntry {
                name: name.to_owned(),
                url: None,
                chip: None,
                project: None,
                version: None,
                size: meta.len(),
                sha256: String::new(),
                error: Some(format!(
                    "{} bytes is more than the {MAX_UPLOAD} an OTA slot can hold",
                    meta.len()
                )),
                signers: None,
                mtime,
            }
        } else {
            // At most one byte more than the limit, should the file grow
            // between the `stat` and the read.
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            std::fs::File::open(&path)?
                .take(MAX_UPLOAD as u64 + 1)
                .read_to_end(&mut bytes)?;
            FirmwareEntry::from_bytes(name, &bytes, mtime)
        };
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(name.to_owned(), e.clone());
        Ok(Some(e))
    }
}

/// Modification time in nanoseconds since the Unix epoch, as entries record
/// it.
pub(crate) fn mtime_of(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Whether a lookup failed because there is nothing by that name (a name
/// too long for the file system is nothing by that name either).
fn gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::NotADirectory
            | std::io::ErrorKind::InvalidFilename
    )
}

/// The largest file [`Catalogue::add`] takes: what the largest OTA slot of
/// the ESP32 family holds (16 MiB of flash, all of it one slot at most).
pub const MAX_UPLOAD: usize = 16 * 1024 * 1024;

/// Why a file was not added to the catalogue or removed from it. Each is
/// the operator's to fix; nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogueError {
    /// The name is not one path component of letters, digits, `.`, `-`,
    /// `_`, `+` (or starts with a dot): rename the file.
    #[error("{0:?} is not a usable file name: use letters, digits, '.', '-', '_' and '+', not starting with '.'")]
    BadName(String),
    /// The file is larger than [`MAX_UPLOAD`].
    #[error("{size} bytes is more than the {max} an OTA slot can hold")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not an ESP-IDF app image a device would accept (the
    /// reason says why, as the device's own validator does).
    #[error("{0}")]
    NotAnImage(String),
    /// A file of that name is in the catalogue: delete it first, or choose
    /// another name (a name a deployment refers to never changes content).
    #[error("{0:?} is already in the catalogue: delete it first or rename the file")]
    Exists(String),
    /// No such file in the catalogue.
    #[error("no firmware {0:?}")]
    Unknown(String),
    /// Reading or writing the directory failed.
    #[error("firmware directory: {0}")]
    Io(#[from] std::io::Error),
}

impl Catalogue {
    /// Adds `bytes` as file `name`, if they are a valid app image of at most
    /// [`MAX_UPLOAD`] bytes and the name is free. The file appears whole or
    /// not at all: it is written under a hidden name (which [`scan`] skips)
    /// and renamed.
    ///
    /// [`scan`]: Catalogue::scan
    pub fn add(&self, name: &str, bytes: &[u8]) -> Result<FirmwareEntry, CatalogueError> {
        if !is_plain_name(name) {
            return Err(CatalogueError::BadName(name.to_owned()));
        }
        if bytes.len() > MAX_UPLOAD {
            return Err(CatalogueError::TooLarge {
                size: bytes.len(),
                max: MAX_UPLOAD,
            });
        }
        let checked = FirmwareEntry::from_bytes(name, bytes, 0);
        if let Some(e) = checked.error {
            return Err(CatalogueError::NotAnImage(e));
        }
        let path = self.dir.join(name);
        let tmp = self
            .dir
            .join(format!(".upload-{}-{name}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        // `hard_link` fails when the name is taken, so two uploads of one
        // name cannot both win (a rename would silently replace).
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(CatalogueError::Exists(name.to_owned()))
            }
            Err(e) => return Err(e.into()),
        }
        Ok(self.entry(name)?.expect("the file was just written"))
    }

    /// Removes file `name` (the caller checks that no running deployment
    /// uses it).
    pub fn remove(&self, name: &str) -> Result<(), CatalogueError> {
        if !is_plain_name(name) {
            return Err(CatalogueError::Unknown(name.to_owned()));
        }
        match std::fs::remove_file(self.dir.join(name)) {
            Ok(()) => {
                self.cache.lock().unwrap().remove(name);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CatalogueError::Unknown(name.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqota_core::image::{Chip, ImageBuilder};

    #[test]
    fn a_valid_image_is_described_and_garbage_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let img = ImageBuilder::new(Chip::Esp32c3)
            .version("1.2.3")
            .project("blinky")
            .size(8192)
            .build()
            .unwrap();
        std::fs::write(dir.path().join("blinky.bin"), &img).unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let c = Catalogue::new(dir.path());
        let list = c.scan().unwrap();
        assert_eq!(list.len(), 2);
        let b = &list[0];
        assert_eq!(b.name, "blinky.bin");
        assert_eq!(b.chip.as_deref(), Some("esp32c3"));
        assert_eq!(b.version.as_deref(), Some("1.2.3"));
        assert_eq!(b.project.as_deref(), Some("blinky"));
        assert_eq!(b.size, 8192);
        assert_eq!(b.sha256, hex::encode(Sha256::digest(&img)));
        assert!(b.is_valid());
        assert!(!list[1].is_valid(), "{:?}", list[1]);
    }

    #[test]
    fn a_signed_image_with_its_signature_sector_is_valid_and_served_whole() {
        let mut img = ImageBuilder::new(Chip::Esp32c3)
            .version("1.2.3")
            .project("blinky")
            .size(5008)
            .build()
            .unwrap();
        // The shape `espsecure sign-data --version 2` leaves: 0xFF to 4 KiB,
        // then one 4 KiB sector (its content is the device's to judge).
        img.resize(8192, 0xFF);
        img.extend_from_slice(&[0xE7; 4096]);
        let e = FirmwareEntry::from_bytes("signed.bin", &img, 0);
        assert!(e.is_valid(), "{:?}", e.error);
        assert_eq!(e.size, 12288);
        assert_eq!(e.sha256, hex::encode(Sha256::digest(&img)));
        assert_eq!(e.signers, Some(vec![]), "garbage blocks sign nothing");
    }

    #[test]
    fn the_signers_are_the_keys_whose_blocks_verify() {
        use mqota_core::signature::sign::{sign_file, Key};
        use p256::pkcs8::{EncodePrivateKey as _, LineEnding};
        let img = ImageBuilder::new(Chip::Esp32c6)
            .version("1.2.3")
            .project("blinky")
            .size(5008)
            .build()
            .unwrap();
        let key = |seed: u8| {
            let pem = p256::SecretKey::from_slice(&[seed; 32])
                .unwrap()
                .to_pkcs8_pem(LineEnding::LF)
                .unwrap();
            Key::from_pem(&pem).unwrap()
        };
        let (a, b) = (key(1), key(2));
        let twice = sign_file(&sign_file(&img, &a).unwrap(), &b).unwrap();
        let e = FirmwareEntry::from_bytes("two.bin", &twice, 0);
        assert!(e.is_valid(), "{:?}", e.error);
        assert_eq!(
            e.signers,
            Some(vec![hex::encode(a.digest()), hex::encode(b.digest())])
        );
        let mut flipped = twice.clone();
        flipped[100] ^= 1;
        let e = FirmwareEntry::from_bytes("flipped.bin", &flipped, 0);
        assert!(
            e.signers.is_none_or(|s| s.is_empty()),
            "a changed byte: no signer"
        );
        assert_eq!(
            FirmwareEntry::from_bytes("plain.bin", &img, 0).signers,
            Some(vec![])
        );
    }

    #[test]
    fn only_a_valid_image_under_a_free_plain_name_is_added_and_a_removed_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalogue::new(dir.path());
        let img = ImageBuilder::new(Chip::Esp32c3)
            .version("2.0.0")
            .project("blinky")
            .size(4096)
            .build()
            .unwrap();
        let e = c.add("blinky-2.bin", &img).unwrap();
        assert_eq!(e.version.as_deref(), Some("2.0.0"));
        assert!(matches!(
            c.add("blinky-2.bin", &img),
            Err(CatalogueError::Exists(_))
        ));
        let err = c.add("notes.bin", b"hello").unwrap_err();
        assert!(
            matches!(&err, CatalogueError::NotAnImage(why) if why.starts_with("not a valid app image")),
            "{err}"
        );
        assert!(matches!(
            c.add("../x.bin", &img),
            Err(CatalogueError::BadName(_))
        ));
        assert!(matches!(
            c.add("big.bin", &vec![0xE9; MAX_UPLOAD + 1]),
            Err(CatalogueError::TooLarge { .. })
        ));
        // Nothing refused was left behind, not even half-written.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["blinky-2.bin"]);
        c.remove("blinky-2.bin").unwrap();
        assert!(c.scan().unwrap().is_empty());
        assert!(matches!(
            c.remove("blinky-2.bin"),
            Err(CatalogueError::Unknown(_))
        ));
    }

    #[test]
    fn names_that_could_leave_the_directory_are_not_plain() {
        for bad in ["", "..", "../x", "a/b", ".env", "a\\b", "a b"] {
            assert!(!is_plain_name(bad), "{bad:?}");
        }
        assert!(is_plain_name("app-1.2.0+unhealthy.bin"));
    }
}
