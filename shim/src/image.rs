//! Container images for `hull do`: a rootfs directory, or an OCI image layout
//! (a directory, or a tar archive of one) that is unpacked into a rootfs.
//!
//! Unpacking is done by hand rather than with `tar::Entry::unpack_in` so that
//! OCI whiteouts are honoured and so that symlinks already in the rootfs are
//! resolved *inside* the rootfs (like a chroot would), never on the host.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Largest JSON document (index.json, manifest, image config) we will read.
const MAX_JSON_BYTES: u64 = 4 * 1024 * 1024;
/// How deep nested image indexes may go.
const MAX_INDEX_DEPTH: usize = 8;
/// How many symlinks one path resolution may traverse.
const MAX_SYMLINKS: usize = 40;

const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The image config fields `hull do` honours.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageConfig {
    /// Environment, "K=V".
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// What an image path given to `hull do` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    /// A directory that is used as the rootfs as is.
    RootfsDir,
    /// A directory holding an OCI image layout.
    OciLayoutDir,
    /// A tar archive (optionally gzip-compressed) of an OCI image layout.
    OciLayoutTar,
}

/// Errors from detecting or unpacking an image. Every message names the
/// offending path or digest and says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {} does not exist: give a rootfs directory or an OCI image layout (directory or .tar)", .path.display())]
    NotFound { path: PathBuf },

    #[error("image {} has no files: give a rootfs directory with a filesystem in it, or an OCI image layout (directory or .tar)", .path.display())]
    EmptyRootfs { path: PathBuf },

    #[error("image {} is neither a directory nor a regular file: give a rootfs directory or an OCI image layout (directory or .tar)", .path.display())]
    UnsupportedKind { path: PathBuf },

    #[error("malformed OCI layout {}: {reason}; re-export the image (e.g. `skopeo copy docker://IMAGE oci:DIR:latest`)", .path.display())]
    Malformed { path: PathBuf, reason: String },

    #[error("invalid blob digest {digest:?} referenced by {}: only \"sha256:\" followed by 64 lowercase hex digits is supported; re-export the image with sha256 digests", .path.display())]
    BadDigest { path: PathBuf, digest: String },

    #[error("blob {digest} is missing from the layout (expected at {}); the layout is incomplete, re-export the image", .path.display())]
    MissingBlob { path: PathBuf, digest: String },

    #[error("blob {} does not match its descriptor: expected {expected}, found {actual}; the layout is corrupt or was modified, re-export the image", .path.display())]
    BlobMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{} is {size} bytes (descriptor or file), over the {limit}-byte limit for image JSON; this does not look like a real index/manifest/config, re-export the image", .path.display())]
    JsonTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("layer {digest} in {} has unsupported media type {media_type:?}: only tar and tar+gzip layers are supported; re-export the image with gzip or uncompressed layers (e.g. `skopeo copy --dest-compress-format gzip`)", .path.display())]
    UnsupportedLayer {
        path: PathBuf,
        digest: String,
        media_type: String,
    },

    #[error("no usable manifest in {}: {reason}", .path.display())]
    NoManifest { path: PathBuf, reason: String },

    #[error("layer {layer}: entry {entry:?} is unsafe ({reason}); refusing to unpack this image, it may be malicious")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    #[error("layer {layer}: {what} {}: {source}", .path.display())]
    Layer {
        layer: String,
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    let what = what.into();
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn malformed(path: &Path, reason: impl Into<String>) -> ImageError {
    ImageError::Malformed {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// Detection
// ---------------------------------------------------------------------------

/// Tells what `path` is: a rootfs directory, an OCI layout directory, or (any
/// regular file) an OCI layout tar.
pub fn detect(path: &Path) -> Result<ImageKind, ImageError> {
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::NotFound {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("cannot stat image", path)(e)),
    };
    if md.is_file() {
        return Ok(ImageKind::OciLayoutTar);
    }
    if !md.is_dir() {
        return Err(ImageError::UnsupportedKind {
            path: path.to_path_buf(),
        });
    }
    let has_layout = path.join("oci-layout").symlink_metadata().is_ok();
    let has_index = path.join("index.json").symlink_metadata().is_ok();
    if has_layout || has_index {
        validate_layout_dir(path)?;
        return Ok(ImageKind::OciLayoutDir);
    }
    let mut entries = fs::read_dir(path).map_err(io_err("cannot read image directory", path))?;
    if entries.next().is_none() {
        return Err(ImageError::EmptyRootfs {
            path: path.to_path_buf(),
        });
    }
    Ok(ImageKind::RootfsDir)
}

#[derive(Deserialize)]
struct OciLayoutFile {
    #[serde(rename = "imageLayoutVersion")]
    image_layout_version: String,
}

/// Checks that `dir` has a valid `oci-layout` file and a parseable `index.json`.
fn validate_layout_dir(dir: &Path) -> Result<Index, ImageError> {
    let layout_path = dir.join("oci-layout");
    let bytes = read_json_file(&layout_path, dir, "oci-layout")?;
    let layout: OciLayoutFile = serde_json::from_slice(&bytes).map_err(|e| {
        malformed(
            dir,
            format!("oci-layout is not valid JSON with imageLayoutVersion: {e}"),
        )
    })?;
    if !layout.image_layout_version.starts_with("1.") {
        return Err(malformed(
            dir,
            format!(
                "unsupported imageLayoutVersion {:?} in oci-layout (want 1.x)",
                layout.image_layout_version
            ),
        ));
    }
    let index_path = dir.join("index.json");
    let bytes = read_json_file(&index_path, dir, "index.json")?;
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(dir, format!("index.json is not a valid image index: {e}")))?;
    if index.schema_version != 2 {
        return Err(malformed(
            dir,
            format!(
                "index.json has schemaVersion {} (want 2)",
                index.schema_version
            ),
        ));
    }
    Ok(index)
}

/// Reads a layout's top-level JSON file (no digest), bounded in size.
fn read_json_file(path: &Path, layout: &Path, name: &str) -> Result<Vec<u8>, ImageError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(malformed(layout, format!("{name} is missing")))
        }
        Err(e) => return Err(io_err(format!("cannot open {name}"), path)(e)),
    };
    let md = f
        .metadata()
        .map_err(io_err(format!("cannot stat {name}"), path))?;
    if !md.is_file() {
        return Err(malformed(layout, format!("{name} is not a regular file")));
    }
    if md.len() > MAX_JSON_BYTES {
        return Err(ImageError::JsonTooLarge {
            path: path.to_path_buf(),
            size: md.len(),
            limit: MAX_JSON_BYTES,
        });
    }
    let mut buf = Vec::with_capacity(md.len() as usize);
    f.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io_err(format!("cannot read {name}"), path))?;
    if buf.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::JsonTooLarge {
            path: path.to_path_buf(),
            size: buf.len() as u64,
            limit: MAX_JSON_BYTES,
        });
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------
// OCI JSON documents (only the fields we use)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ConfigSection>,
}

#[derive(Debug, Default, Deserialize)]
struct ConfigSection {
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    working_dir: Option<String>,
    #[serde(rename = "User", default)]
    user: Option<String>,
}

/// A validated `sha256:<hex>` digest.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BlobRef {
    hex: String,
}

impl fmt::Display for BlobRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

fn parse_digest(digest: &str, referrer: &Path) -> Result<BlobRef, ImageError> {
    let bad = || ImageError::BadDigest {
        path: referrer.to_path_buf(),
        digest: digest.to_string(),
    };
    let hex = digest.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(bad());
    }
    Ok(BlobRef {
        hex: hex.to_string(),
    })
}

// ---------------------------------------------------------------------------
// Layout access
// ---------------------------------------------------------------------------

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn blob_path(&self, blob: &BlobRef) -> PathBuf {
        // `blob.hex` is validated hex: no path components can sneak in.
        self.dir.join("blobs").join("sha256").join(&blob.hex)
    }

    /// Opens the blob named by `desc`, after checking its size and sha256.
    /// Returns the validated reference and the blob path.
    fn verified_blob(
        &self,
        desc: &Descriptor,
        referrer: &Path,
    ) -> Result<(BlobRef, PathBuf), ImageError> {
        let blob = parse_digest(&desc.digest, referrer)?;
        let path = self.blob_path(&blob);
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::MissingBlob {
                    path,
                    digest: blob.to_string(),
                })
            }
            Err(e) => return Err(io_err("cannot stat blob", &path)(e)),
        };
        if !md.is_file() {
            return Err(malformed(
                &self.dir,
                format!("blob {blob} is not a regular file"),
            ));
        }
        if desc.size < 0 || md.len() != desc.size as u64 {
            return Err(ImageError::BlobMismatch {
                path,
                expected: format!("size {}", desc.size),
                actual: format!("size {}", md.len()),
            });
        }
        let mut f = File::open(&path).map_err(io_err("cannot open blob", &path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(io_err("cannot read blob", &path))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buf[..n]);
        }
        let actual = hex(&hasher.finalize());
        if total != desc.size as u64 {
            return Err(ImageError::BlobMismatch {
                path,
                expected: format!("size {}", desc.size),
                actual: format!("size {total}"),
            });
        }
        if actual != blob.hex {
            return Err(ImageError::BlobMismatch {
                path,
                expected: blob.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok((blob, path))
    }

    /// Reads a small JSON blob, verified and bounded.
    fn json_blob(
        &self,
        desc: &Descriptor,
        referrer: &Path,
    ) -> Result<(BlobRef, PathBuf, Vec<u8>), ImageError> {
        let blob = parse_digest(&desc.digest, referrer)?;
        if desc.size < 0 || desc.size as u64 > MAX_JSON_BYTES {
            return Err(ImageError::JsonTooLarge {
                path: self.blob_path(&blob),
                size: desc.size.max(0) as u64,
                limit: MAX_JSON_BYTES,
            });
        }
        let (blob, path) = self.verified_blob(desc, referrer)?;
        let bytes = fs::read(&path).map_err(io_err("cannot read blob", &path))?;
        // Re-check what we actually read, in case the file changed.
        let actual = hex(&Sha256::digest(&bytes));
        if actual != blob.hex || bytes.len() as u64 != desc.size as u64 {
            return Err(ImageError::BlobMismatch {
                path,
                expected: blob.to_string(),
                actual: format!("sha256:{actual}"),
            });
        }
        Ok((blob, path, bytes))
    }

    /// Follows `index.json` (and nested indexes) down to one image manifest.
    fn pick_manifest(&self, index: Index) -> Result<(Manifest, PathBuf), ImageError> {
        let mut index = index;
        let mut referrer = self.dir.join("index.json");
        for _ in 0..MAX_INDEX_DEPTH {
            let desc = choose_descriptor(&index.manifests, &referrer)?;
            let (_, path, bytes) = self.json_blob(&desc, &referrer)?;
            match desc.media_type.as_str() {
                MT_OCI_INDEX | MT_DOCKER_LIST => {
                    index = serde_json::from_slice(&bytes)
                        .map_err(|e| malformed(&self.dir, format!("image index {} is not valid: {e}", desc.digest)))?;
                    referrer = path;
                }
                MT_OCI_MANIFEST | MT_DOCKER_MANIFEST => {
                    let m: Manifest = serde_json::from_slice(&bytes)
                        .map_err(|e| malformed(&self.dir, format!("image manifest {} is not valid: {e}", desc.digest)))?;
                    if m.schema_version != 2 {
                        return Err(malformed(
                            &self.dir,
                            format!("manifest {} has schemaVersion {} (want 2)", desc.digest, m.schema_version),
                        ));
                    }
                    return Ok((m, path));
                }
                other => {
                    return Err(malformed(
                        &self.dir,
                        format!(
                            "descriptor {} in {} has media type {other:?}; expected an OCI image manifest or index",
                            desc.digest,
                            referrer.display()
                        ),
                    ))
                }
            }
        }
        Err(malformed(
            &self.dir,
            format!("image indexes nest deeper than {MAX_INDEX_DEPTH} levels"),
        ))
    }
}

/// Picks one descriptor from an index: the only one, else the first for
/// linux/amd64, else the first without a platform.
fn choose_descriptor(list: &[Descriptor], referrer: &Path) -> Result<Descriptor, ImageError> {
    match list {
        [] => Err(ImageError::NoManifest {
            path: referrer.to_path_buf(),
            reason: "the index lists no manifests; re-export the image".into(),
        }),
        [only] => {
            if let Some(p) = &only.platform {
                if !(p.os.is_empty() || p.os == "linux" && p.architecture == "amd64") {
                    tracing::warn!(
                        "image manifest {} is for {}/{}, not linux/amd64; using it anyway",
                        only.digest,
                        p.os,
                        p.architecture
                    );
                }
            }
            Ok(only.clone())
        }
        many => {
            if let Some(d) = many.iter().find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            }) {
                return Ok(d.clone());
            }
            if let Some(d) = many.iter().find(|d| d.platform.is_none()) {
                return Ok(d.clone());
            }
            let platforms: Vec<String> = many
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            Err(ImageError::NoManifest {
                path: referrer.to_path_buf(),
                reason: format!(
                    "none of its {} manifests is for linux/amd64 (found: {}); pull or export the linux/amd64 image",
                    many.len(),
                    platforms.join(", ")
                ),
            })
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

// ---------------------------------------------------------------------------
// Unpacking
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
}

fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        _ => None,
    }
}

/// Unpacks an OCI layout (dir or tar, per `kind`) into `rootfs` (an existing
/// empty directory), using `scratch` (an existing empty directory) for
/// temporary files. Returns the image config.
pub fn unpack(
    path: &Path,
    kind: ImageKind,
    scratch: &Path,
    rootfs: &Path,
) -> Result<ImageConfig, ImageError> {
    let layout_dir = match kind {
        ImageKind::RootfsDir => {
            return Err(malformed(
                path,
                "this is a rootfs directory, not an OCI layout; use it as the rootfs directly",
            ))
        }
        ImageKind::OciLayoutDir => path.to_path_buf(),
        ImageKind::OciLayoutTar => extract_layout_tar(path, scratch)?,
    };
    let index = validate_layout_dir(&layout_dir)?;
    let layout = Layout { dir: layout_dir };
    let (manifest, manifest_path) = layout.pick_manifest(index)?;

    // Check every layer's media type before touching the rootfs.
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for desc in &manifest.layers {
        let blob = parse_digest(&desc.digest, &manifest_path)?;
        let comp =
            layer_compression(&desc.media_type).ok_or_else(|| ImageError::UnsupportedLayer {
                path: manifest_path.clone(),
                digest: blob.to_string(),
                media_type: desc.media_type.clone(),
            })?;
        layers.push((desc, comp));
    }

    let (_, _, config_bytes) = layout.json_blob(&manifest.config, &manifest_path)?;
    let config_blob: ConfigBlob = serde_json::from_slice(&config_bytes).map_err(|e| {
        malformed(
            &layout.dir,
            format!("image config {} is not valid: {e}", manifest.config.digest),
        )
    })?;

    let root = fs::canonicalize(rootfs).map_err(io_err("cannot open rootfs directory", rootfs))?;
    for (desc, comp) in layers {
        let (blob, blob_path) = layout.verified_blob(desc, &manifest_path)?;
        let f = File::open(&blob_path).map_err(io_err("cannot open layer", &blob_path))?;
        let reader: Box<dyn Read> = match comp {
            Compression::None => Box::new(io::BufReader::new(f)),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(f))),
        };
        tracing::debug!("applying layer {blob}");
        apply_layer(reader, &root, &blob.to_string())?;
    }

    let c = config_blob.config.unwrap_or_default();
    Ok(ImageConfig {
        env: c.env.unwrap_or_default(),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
        working_dir: c.working_dir.filter(|s| !s.is_empty()),
        user: c.user.filter(|s| !s.is_empty()),
    })
}

/// Splits an archive path into its normal components, refusing absolute
/// paths and `..`. Returns an empty vector for the archive root (`./`).
fn safe_components(p: &Path) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err("path contains \"..\"".into()),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
        }
    }
    Ok(out)
}

/// Extracts a layout tar (plain or gzip) into `scratch/layout`: only regular
/// files and directories are accepted. Returns the layout directory (the
/// extraction root, or its only subdirectory if that is where the layout is).
fn extract_layout_tar(tar_path: &Path, scratch: &Path) -> Result<PathBuf, ImageError> {
    let mut f = File::open(tar_path).map_err(io_err("cannot open image archive", tar_path))?;
    let mut magic = [0u8; 2];
    let n = f
        .read(&mut magic)
        .map_err(io_err("cannot read image archive", tar_path))?;
    drop(f);
    let f = io::BufReader::new(
        File::open(tar_path).map_err(io_err("cannot open image archive", tar_path))?,
    );
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let dest = scratch.join("layout");
    fs::create_dir(&dest).map_err(io_err("cannot create scratch directory", &dest))?;
    let bad_tar = |reason: String| malformed(tar_path, reason);
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad_tar(format!("not a tar archive: {e}")))?;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_tar(format!("cannot read tar archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad_tar(format!("bad entry path: {e}")))?
            .into_owned();
        let comps = safe_components(&raw).map_err(|r| {
            bad_tar(format!(
                "entry {:?} is unsafe ({r})",
                raw.display().to_string()
            ))
        })?;
        let et = entry.header().entry_type();
        let target = comps.iter().fold(dest.clone(), |p, c| p.join(c));
        match et {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(io_err("cannot create directory", &target))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if comps.is_empty() {
                    return Err(bad_tar("a regular file entry names the archive root".into()));
                }
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(io_err("cannot create directory", parent))?;
                }
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o644)
                    .open(&target)
                    .map_err(io_err("cannot create file", &target))?;
                io::copy(&mut entry, &mut out).map_err(io_err("cannot extract file", &target))?;
                count += 1;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(bad_tar(format!(
                    "entry {:?} has type {other:?}; an OCI layout archive holds only files and directories",
                    raw.display().to_string()
                )))
            }
        }
    }
    if count == 0 {
        return Err(bad_tar("the archive holds no files".into()));
    }
    if dest.join("index.json").exists() || dest.join("oci-layout").exists() {
        return Ok(dest);
    }
    // Tolerate an archive whose contents sit in a single top-level directory.
    let subdirs: Vec<PathBuf> = fs::read_dir(&dest)
        .map_err(io_err("cannot read scratch directory", &dest))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    if let [only] = subdirs.as_slice() {
        if only.is_dir() && (only.join("index.json").exists() || only.join("oci-layout").exists()) {
            return Ok(only.clone());
        }
    }
    Err(malformed(
        tar_path,
        "the archive has no oci-layout and index.json at its top level",
    ))
}

/// Metadata from a tar entry, PAX overrides applied.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<EntryMeta> {
    let h = entry.header();
    let mut meta = EntryMeta {
        mode: h.mode()? & 0o7777,
        uid: h.uid()? as u32,
        gid: h.gid()? as u32,
        mtime: h.mtime()? as i64,
        xattrs: Vec::new(),
    };
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            let val = ext.value_bytes();
            let num = || {
                std::str::from_utf8(val)
                    .ok()
                    .and_then(|s| s.split('.').next()?.parse::<i64>().ok())
            };
            match key {
                "uid" => meta.uid = num().unwrap_or(meta.uid as i64) as u32,
                "gid" => meta.gid = num().unwrap_or(meta.gid as i64) as u32,
                "mtime" => meta.mtime = num().unwrap_or(meta.mtime),
                k if k.starts_with("SCHILY.xattr.") => {
                    meta.xattrs
                        .push((k.as_bytes()["SCHILY.xattr.".len()..].to_vec(), val.to_vec()));
                }
                _ => {}
            }
        }
    }
    Ok(meta)
}

/// State for applying one layer onto `root`.
struct Applier<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Paths (relative to root) that this layer created or declared; lower
    /// layer content is what is not in here.
    this_layer: HashSet<PathBuf>,
    /// Directories whose mtime to set once the layer is done.
    dir_times: Vec<(PathBuf, i64)>,
}

fn apply_layer(reader: Box<dyn Read>, root: &Path, layer: &str) -> Result<(), ImageError> {
    let mut ap = Applier {
        root,
        layer,
        this_layer: HashSet::new(),
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(reader);
    let bad = |e: io::Error| ImageError::Layer {
        layer: layer.to_string(),
        what: "cannot read layer tar".into(),
        path: root.to_path_buf(),
        source: e,
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        ap.apply_entry(&mut entry)?;
    }
    for (dir, mtime) in ap.dir_times.iter().rev() {
        set_mtime(dir, *mtime);
    }
    Ok(())
}

impl Applier<'_> {
    fn layer_err(
        &self,
        what: impl Into<String>,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> ImageError {
        let (layer, what, path) = (self.layer.to_string(), what.into(), path.to_path_buf());
        move |source| ImageError::Layer {
            layer,
            what,
            path,
            source,
        }
    }

    fn unsafe_entry(&self, entry: &Path, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: entry.display().to_string(),
            reason: reason.into(),
        }
    }

    /// Resolves `comps` as a directory inside root, following symlinks as if
    /// root were `/` (absolute targets restart at root, `..` stops at root),
    /// creating missing directories when `create`. Returns the host path of
    /// the directory and its path relative to root.
    fn resolve_dir(
        &self,
        comps: &[OsString],
        create: bool,
    ) -> Result<(PathBuf, PathBuf), ImageError> {
        let mut cur = PathBuf::new();
        let mut pending: std::collections::VecDeque<OsString> = comps.iter().cloned().collect();
        let mut links = 0usize;
        while let Some(c) = pending.pop_front() {
            if c == OsStr::new(".") || c.is_empty() {
                continue;
            }
            if c == OsStr::new("..") {
                cur.pop();
                continue;
            }
            let full = self.root.join(&cur).join(&c);
            match fs::symlink_metadata(&full) {
                Ok(md) if md.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(self
                            .layer_err("too many levels of symbolic links at", &full)(
                            io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    let target = fs::read_link(&full)
                        .map_err(self.layer_err("cannot read symlink", &full))?;
                    if target.is_absolute() {
                        cur = PathBuf::new();
                    }
                    let mut tc: Vec<OsString> = Vec::new();
                    for comp in target.components() {
                        match comp {
                            Component::Normal(n) => tc.push(n.to_os_string()),
                            Component::ParentDir => tc.push(OsString::from("..")),
                            _ => {}
                        }
                    }
                    for comp in tc.into_iter().rev() {
                        pending.push_front(comp);
                    }
                }
                Ok(md) if md.is_dir() => cur.push(&c),
                Ok(_) => {
                    return Err(self.layer_err("a parent path is not a directory:", &full)(
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&full)
                        .map_err(self.layer_err("cannot create directory", &full))?;
                    fs::set_permissions(&full, fs::Permissions::from_mode(0o755))
                        .map_err(self.layer_err("cannot chmod directory", &full))?;
                    // New in this layer, so it holds no lower-layer content.
                    cur.push(&c);
                }
                Err(e) => return Err(self.layer_err("cannot stat", &full)(e)),
            }
        }
        Ok((self.root.join(&cur), cur))
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ImageError> {
        let raw = entry
            .path()
            .map_err(self.layer_err("bad entry path in layer", self.root))?
            .into_owned();
        let et = entry.header().entry_type();
        if matches!(et, tar::EntryType::XGlobalHeader | tar::EntryType::XHeader) {
            return Ok(());
        }
        let comps = safe_components(&raw).map_err(|r| self.unsafe_entry(&raw, r))?;
        let meta = entry_meta(entry).map_err(self.layer_err("bad entry header for", &raw))?;

        let Some((name, parent)) = comps.split_last() else {
            // The archive root ("./"): apply its metadata to the rootfs root.
            if et == tar::EntryType::Directory {
                self.set_meta(self.root, &meta, false)?;
            }
            return Ok(());
        };
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if let Some(rest) = name_bytes.strip_prefix(b".wh.") {
            let (dir, dir_rel) = self.resolve_dir(parent, false).or_else(|e| match e {
                // Whiting out in a directory that does not exist: nothing to do.
                ImageError::Layer { ref source, .. }
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    Ok((PathBuf::new(), PathBuf::new()))
                }
                e => Err(e),
            })?;
            if dir.as_os_str().is_empty() {
                return Ok(());
            }
            if rest == b".wh..opq" {
                let children =
                    fs::read_dir(&dir).map_err(self.layer_err("cannot read directory", &dir))?;
                for child in children {
                    let child = child.map_err(self.layer_err("cannot read directory", &dir))?;
                    self.remove_lower(
                        &dir.join(child.file_name()),
                        &dir_rel.join(child.file_name()),
                    )?;
                }
            } else if rest.starts_with(b".wh.") {
                // Other AUFS metadata (.wh..wh.plnk etc.): not content.
            } else if rest.is_empty() || rest == b"." || rest == b".." || rest.contains(&b'/') {
                return Err(self.unsafe_entry(&raw, "whiteout names no file"));
            } else {
                let victim = OsStr::from_bytes(rest);
                self.remove_lower(&dir.join(victim), &dir_rel.join(victim))?;
            }
            return Ok(());
        }

        let (dir, dir_rel) = self.resolve_dir(parent, true)?;
        let target = dir.join(name);
        let rel = dir_rel.join(name);

        // Replace whatever is there, unless both old and new are directories.
        let existing = match fs::symlink_metadata(&target) {
            Ok(md) => Some(md),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(self.layer_err("cannot stat", &target)(e)),
        };
        if let Some(md) = &existing {
            if !(md.is_dir() && et == tar::EntryType::Directory) {
                if md.is_dir() {
                    fs::remove_dir_all(&target)
                } else {
                    fs::remove_file(&target)
                }
                .map_err(self.layer_err("cannot replace", &target))?;
            }
        }

        let mode = nix::sys::stat::Mode::from_bits_truncate(meta.mode & 0o777);
        match et {
            tar::EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    fs::create_dir(&target)
                        .map_err(self.layer_err("cannot create directory", &target))?;
                }
                self.set_meta(&target, &meta, false)?;
                self.dir_times.push((target.clone(), meta.mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .mode(0o600)
                    .open(&target)
                    .map_err(self.layer_err("cannot create file", &target))?;
                io::copy(entry, &mut out).map_err(self.layer_err("cannot write file", &target))?;
                drop(out);
                self.set_meta(&target, &meta, false)?;
                set_mtime(&target, meta.mtime);
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(self.layer_err("bad symlink target for", &target))?
                    .ok_or_else(|| self.unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                // The target is stored verbatim; it is only ever resolved
                // inside the rootfs (here) or inside the container.
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(self.layer_err("cannot create symlink", &target))?;
                self.set_meta(&target, &meta, true)?;
                set_mtime(&target, meta.mtime);
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name()
                    .map_err(self.layer_err("bad hardlink target for", &target))?
                    .ok_or_else(|| self.unsafe_entry(&raw, "hardlink without a target"))?
                    .into_owned();
                let lcomps = safe_components(&link).map_err(|r| {
                    self.unsafe_entry(&raw, format!("hardlink target {}: {r}", link.display()))
                })?;
                let Some((lname, lparent)) = lcomps.split_last() else {
                    return Err(self.unsafe_entry(&raw, "hardlink to the root directory"));
                };
                let (ldir, _) = self.resolve_dir(lparent, false)?;
                let src = ldir.join(lname);
                let smd = fs::symlink_metadata(&src)
                    .map_err(self.layer_err("hardlink target missing:", &src))?;
                if smd.is_dir() {
                    return Err(self.unsafe_entry(&raw, "hardlink to a directory"));
                }
                // linkat without AT_SYMLINK_FOLLOW links a symlink itself, never its target.
                nix::unistd::linkat(
                    None,
                    &src,
                    None,
                    &target,
                    nix::unistd::LinkatFlags::NoSymlinkFollow,
                )
                .map_err(|e| {
                    self.layer_err("cannot create hardlink", &target)(io::Error::from(e))
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let h = entry.header();
                let major = h.device_major().ok().flatten().unwrap_or(0) as u64;
                let minor = h.device_minor().ok().flatten().unwrap_or(0) as u64;
                let kind = match et {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                nix::sys::stat::mknod(&target, kind, mode, nix::sys::stat::makedev(major, minor))
                    .map_err(|e| {
                    self.layer_err("cannot create device node", &target)(io::Error::from(e))
                })?;
                self.set_meta(&target, &meta, false)?;
                set_mtime(&target, meta.mtime);
            }
            other => {
                return Err(
                    self.unsafe_entry(&raw, format!("unsupported tar entry type {other:?}"))
                );
            }
        }
        self.this_layer.insert(rel);
        Ok(())
    }

    /// Removes lower-layer content at `path` (relative `rel`), keeping
    /// anything this layer has put there.
    fn remove_lower(&self, path: &Path, rel: &Path) -> Result<(), ImageError> {
        let md = match fs::symlink_metadata(path) {
            Ok(md) => md,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(self.layer_err("cannot stat", path)(e)),
        };
        let ours = self.this_layer.contains(rel);
        if !md.is_dir() {
            if !ours {
                fs::remove_file(path).map_err(self.layer_err("cannot remove", path))?;
            }
            return Ok(());
        }
        if !ours && !self.this_layer.iter().any(|p| p.starts_with(rel)) {
            return fs::remove_dir_all(path).map_err(self.layer_err("cannot remove", path));
        }
        let children = fs::read_dir(path).map_err(self.layer_err("cannot read directory", path))?;
        for child in children {
            let child = child.map_err(self.layer_err("cannot read directory", path))?;
            self.remove_lower(&path.join(child.file_name()), &rel.join(child.file_name()))?;
        }
        if !ours
            && fs::read_dir(path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            fs::remove_dir(path).map_err(self.layer_err("cannot remove", path))?;
        }
        Ok(())
    }

    /// Applies ownership, mode and xattrs. Never follows a symlink.
    fn set_meta(&self, path: &Path, meta: &EntryMeta, is_symlink: bool) -> Result<(), ImageError> {
        if let Err(e) = std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid)) {
            // Unprivileged (e.g. in tests): ownership cannot be kept.
            if !(e.raw_os_error() == Some(libc::EPERM) && nix::unistd::geteuid().as_raw() != 0) {
                return Err(self.layer_err("cannot chown", path)(e));
            }
        }
        for (name, value) in &meta.xattrs {
            if let Err(e) = lsetxattr(path, name, value) {
                tracing::warn!(
                    "layer {}: cannot set xattr {} on {}: {e}",
                    self.layer,
                    String::from_utf8_lossy(name),
                    path.display()
                );
            }
        }
        if !is_symlink {
            // After chown, which clears set-id bits.
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
                .map_err(self.layer_err("cannot chmod", path))?;
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, mtime: i64) {
    let ts = nix::sys::time::TimeSpec::new(mtime, 0);
    let _ = nix::sys::stat::utimensat(
        None,
        path,
        &ts,
        &ts,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    );
}

fn lsetxattr(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: `path` and `name` are NUL-terminated C strings that outlive the
    // call; `value` points to `value.len()` readable bytes.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A unique temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "hull-image-test-{}-{tag}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn sub(&self, name: &str) -> PathBuf {
            let p = self.0.join(name);
            fs::create_dir_all(&p).unwrap();
            p
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Owned(&'a str, &'a [u8], u32, u64, u64),
        Symlink(&'a str, &'a str),
        Hardlink(&'a str, &'a str),
        Char(&'a str, u32, u32),
    }

    /// Builds a layer tar, writing names raw so that unsafe ones get through.
    fn layer(entries: &[E]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            let (name, ty, data, mode, link): (&str, tar::EntryType, &[u8], u32, Option<&str>) =
                match e {
                    E::Dir(n, m) => (n, tar::EntryType::Directory, b"", *m, None),
                    E::File(n, d, m) | E::Owned(n, d, m, _, _) => {
                        (n, tar::EntryType::Regular, d, *m, None)
                    }
                    E::Symlink(n, t) => (n, tar::EntryType::Symlink, b"", 0o777, Some(t)),
                    E::Hardlink(n, t) => (n, tar::EntryType::Link, b"", 0o644, Some(t)),
                    E::Char(n, _, _) => (n, tar::EntryType::Char, b"", 0o666, None),
                };
            {
                let raw = &mut h.as_old_mut().name;
                raw.fill(0);
                raw[..name.len()].copy_from_slice(name.as_bytes());
            }
            if let Some(l) = link {
                let raw = &mut h.as_old_mut().linkname;
                raw.fill(0);
                raw[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_entry_type(ty);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_000_000);
            match e {
                E::Owned(_, _, _, u, g) => {
                    h.set_uid(*u);
                    h.set_gid(*g);
                }
                _ => {
                    h.set_uid(0);
                    h.set_gid(0);
                }
            }
            if let E::Char(_, maj, min) = e {
                h.set_device_major(*maj).unwrap();
                h.set_device_minor(*min).unwrap();
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn put_blob(layout: &Path, data: &[u8]) -> String {
        let hex = hex(&Sha256::digest(data));
        let dir = layout.join("blobs/sha256");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(&hex), data).unwrap();
        format!("sha256:{hex}")
    }

    fn desc(media_type: &str, digest: &str, size: usize) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": digest, "size": size})
    }

    const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    const TGZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

    /// Writes a complete layout; returns the manifest digest.
    fn make_layout(layout: &Path, layers: &[(Vec<u8>, &str)], config: serde_json::Value) -> String {
        fs::create_dir_all(layout).unwrap();
        fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let cfg = serde_json::to_vec(&config).unwrap();
        let cfg_digest = put_blob(layout, &cfg);
        let layer_descs: Vec<_> = layers
            .iter()
            .map(|(data, mt)| desc(mt, &put_blob(layout, data), data.len()))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", &cfg_digest, cfg.len()),
            "layers": layer_descs,
        }))
        .unwrap();
        let m_digest = put_blob(layout, &manifest);
        let mut md = desc(MT_OCI_MANIFEST, &m_digest, manifest.len());
        md["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [md]});
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        m_digest
    }

    fn empty_config() -> serde_json::Value {
        serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    }

    fn unpack_dir(t: &TempDir, layout: &Path) -> Result<(ImageConfig, PathBuf), ImageError> {
        let kind = detect(layout)?;
        let rootfs = t.sub("rootfs");
        let scratch = t.sub("scratch");
        unpack(layout, kind, &scratch, &rootfs).map(|c| (c, rootfs))
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn two_layers_with_whiteouts_and_opaque_dir() {
        let t = TempDir::new("layers");
        let l1 = layer(&[
            E::Dir("./", 0o755),
            E::Dir("./etc/", 0o755),
            E::File("./etc/a", b"a", 0o644),
            E::File("./etc/b", b"b", 0o600),
            E::Dir("./opq/", 0o755),
            E::File("./opq/old", b"old", 0o644),
            E::Dir("./opq/sub/", 0o755),
            E::File("./opq/sub/deep", b"deep", 0o644),
            E::Dir("./bin/", 0o755),
            E::File("./bin/tool", b"#!", 0o4755),
            E::Symlink("./bin/sym", "tool"),
            E::Hardlink("./bin/hard", "./bin/tool"),
            E::Owned("./home", b"x", 0o640, 1000, 1001),
            E::Symlink("./gone", "/etc"),
        ]);
        let mut l2_entries = vec![
            E::File("etc/.wh.a", b"", 0o644),
            E::File("./.wh.gone", b"", 0o644),
            // Same-layer content before the opaque marker must survive it.
            E::File("opq/new", b"new", 0o644),
            E::File("opq/.wh..wh..opq", b"", 0o644),
            E::File("etc/.wh.missing", b"", 0o644),
            E::File("nodir/.wh.x", b"", 0o644),
        ];
        if is_root() {
            l2_entries.push(E::Char("dev-null", 1, 3));
        }
        let l2 = layer(&l2_entries);
        let layout = t.0.join("layout");
        make_layout(&layout, &[(l1, TAR), (l2, TAR)], empty_config());
        let (cfg, root) = unpack_dir(&t, &layout).unwrap();
        assert_eq!(cfg, ImageConfig::default());

        assert!(!root.join("etc/a").exists());
        assert_eq!(fs::read(root.join("etc/b")).unwrap(), b"b");
        assert_eq!(
            fs::metadata(root.join("etc/b")).unwrap().mode() & 0o7777,
            0o600
        );
        assert!(fs::symlink_metadata(root.join("gone")).is_err());
        assert!(!root.join("opq/old").exists());
        assert!(!root.join("opq/sub").exists());
        assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"new");
        assert!(!root.join("nodir").exists());
        for wh in ["etc/.wh.a", "opq/.wh..wh..opq"] {
            assert!(
                fs::symlink_metadata(root.join(wh)).is_err(),
                "{wh} materialised"
            );
        }

        assert_eq!(
            fs::read_link(root.join("bin/sym")).unwrap(),
            Path::new("tool")
        );
        let tool = fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(tool.mode() & 0o7777, 0o4755);
        assert_eq!(
            tool.ino(),
            fs::metadata(root.join("bin/hard")).unwrap().ino()
        );
        assert_eq!(tool.mtime(), 1_000_000);
        if is_root() {
            let home = fs::metadata(root.join("home")).unwrap();
            assert_eq!(
                (home.uid(), home.gid(), home.mode() & 0o777),
                (1000, 1001, 0o640)
            );
            let dev = fs::metadata(root.join("dev-null")).unwrap();
            assert!(dev.file_type().is_char_device());
            assert_eq!(dev.rdev(), nix::sys::stat::makedev(1, 3));
        }
    }

    #[test]
    fn gzip_layer_and_config_fields() {
        let t = TempDir::new("gzip");
        let l = gzip(&layer(&[
            E::Dir("bin", 0o755),
            E::File("bin/sh", b"shell", 0o755),
        ]));
        let layout = t.0.join("layout");
        let mut config = empty_config();
        config["config"] = serde_json::json!({
            "Env": ["PATH=/bin", "A=b"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo hi"],
            "WorkingDir": "/work",
            "User": "1000:1000",
        });
        make_layout(&layout, &[(l, TGZ)], config);
        let (cfg, root) = unpack_dir(&t, &layout).unwrap();
        assert_eq!(fs::read(root.join("bin/sh")).unwrap(), b"shell");
        assert_eq!(
            cfg,
            ImageConfig {
                env: vec!["PATH=/bin".into(), "A=b".into()],
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo hi".into()],
                working_dir: Some("/work".into()),
                user: Some("1000:1000".into()),
            }
        );
    }

    #[test]
    fn layout_tar_is_unpacked() {
        let t = TempDir::new("tar");
        let layout = t.0.join("layout");
        let mut config = empty_config();
        config["config"] = serde_json::json!({"Cmd": ["sh"], "Entrypoint": null, "WorkingDir": ""});
        make_layout(
            &layout,
            &[(layer(&[E::File("hello", b"world", 0o644)]), TAR)],
            config,
        );
        let tar_path = t.0.join("image.tar");
        let mut b = tar::Builder::new(File::create(&tar_path).unwrap());
        b.append_dir_all(".", &layout).unwrap();
        b.into_inner().unwrap();
        assert_eq!(detect(&tar_path).unwrap(), ImageKind::OciLayoutTar);
        let (rootfs, scratch) = (t.sub("rootfs"), t.sub("scratch"));
        let cfg = unpack(&tar_path, ImageKind::OciLayoutTar, &scratch, &rootfs).unwrap();
        assert_eq!(fs::read(rootfs.join("hello")).unwrap(), b"world");
        assert_eq!(
            cfg,
            ImageConfig {
                cmd: vec!["sh".into()],
                ..Default::default()
            }
        );
    }

    #[test]
    fn digest_and_size_mismatch_rejected() {
        let t = TempDir::new("digest");
        let layout = t.0.join("layout");
        let l = layer(&[E::File("f", b"data", 0o644)]);
        let hexd = hex(&Sha256::digest(&l));
        make_layout(&layout, &[(l.clone(), TAR)], empty_config());
        let blob = layout.join("blobs/sha256").join(&hexd);

        let mut tampered = l.clone();
        tampered[600] ^= 1;
        fs::write(&blob, &tampered).unwrap();
        let err = unpack_dir(&t, &layout).unwrap_err();
        assert!(matches!(err, ImageError::BlobMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&hexd), "{err}");
        assert!(!t.0.join("rootfs/f").exists());

        fs::write(&blob, &l[..l.len() - 512]).unwrap();
        let err = unpack(&layout, ImageKind::OciLayoutDir, &t.sub("s2"), &t.sub("r2")).unwrap_err();
        assert!(matches!(err, ImageError::BlobMismatch { .. }), "{err}");
        assert!(err.to_string().contains("size"), "{err}");
    }

    #[test]
    fn bad_digest_references_rejected() {
        assert!(parse_digest("sha256:../../../etc/passwd", Path::new("x")).is_err());
        assert!(parse_digest(&format!("sha512:{}", "a".repeat(128)), Path::new("x")).is_err());
        assert!(parse_digest(&format!("sha256:{}", "A".repeat(64)), Path::new("x")).is_err());
        assert!(parse_digest(&format!("sha256:{}/", "a".repeat(63)), Path::new("x")).is_err());
        assert!(parse_digest(&format!("sha256:{}", "a".repeat(64)), Path::new("x")).is_ok());

        let t = TempDir::new("baddigest");
        let layout = t.0.join("layout");
        make_layout(&layout, &[], empty_config());
        fs::write(
            layout.join("index.json"),
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../../../../etc/passwd","size":10}]}"#,
        )
        .unwrap();
        let err = unpack_dir(&t, &layout).unwrap_err();
        assert!(matches!(err, ImageError::BadDigest { .. }), "{err}");
    }

    #[test]
    fn dotdot_and_absolute_entries_rejected() {
        let t = TempDir::new("dotdot");
        let host = t.sub("host");
        for (i, name) in ["../../host/evil", "/abs/evil", "a/../../evil"]
            .iter()
            .enumerate()
        {
            let layout = t.0.join(format!("layout{i}"));
            make_layout(
                &layout,
                &[(layer(&[E::File(name, b"pwned", 0o644)]), TAR)],
                empty_config(),
            );
            let rootfs = t.sub(&format!("r{i}"));
            let err = unpack(
                &layout,
                ImageKind::OciLayoutDir,
                &t.sub(&format!("s{i}")),
                &rootfs,
            )
            .unwrap_err();
            assert!(
                matches!(err, ImageError::UnsafeEntry { .. }),
                "{name}: {err}"
            );
        }
        assert!(!host.join("evil").exists());
        assert!(!t.0.join("evil").exists());

        let layout = t.0.join("layout-hl");
        make_layout(
            &layout,
            &[(layer(&[E::Hardlink("x", "../../host/target")]), TAR)],
            empty_config(),
        );
        let err = unpack(
            &layout,
            ImageKind::OciLayoutDir,
            &t.sub("s-hl"),
            &t.sub("r-hl"),
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    }

    #[test]
    fn symlink_escape_neutralised() {
        let t = TempDir::new("symlink");
        let host = t.sub("host");
        fs::write(host.join("passwd"), b"host").unwrap();
        let host_abs = host.to_str().unwrap().to_string();
        let l1 = layer(&[
            E::Symlink("abs", &host_abs),
            E::Symlink("rel", "../../../../../../../.."),
            E::Symlink("hostfile", &format!("{host_abs}/passwd")),
        ]);
        let rel_target = format!("rel{host_abs}/passwd");
        let l2 = layer(&[
            E::File("abs/passwd", b"pwned", 0o644),
            E::File(&rel_target, b"pwned2", 0o644),
            // Writing over a symlink replaces the link, not its target.
            E::File("hostfile", b"pwned3", 0o644),
            E::Hardlink("hl", "hostfile"),
        ]);
        let layout = t.0.join("layout");
        make_layout(&layout, &[(l1, TAR), (l2, TAR)], empty_config());
        let (_, root) = unpack_dir(&t, &layout).unwrap();
        assert_eq!(fs::read(host.join("passwd")).unwrap(), b"host");
        assert_eq!(fs::read_dir(&host).unwrap().count(), 1);
        // The writes landed inside the rootfs, where a chroot would put them.
        let inside = root.join(host_abs.trim_start_matches('/')).join("passwd");
        assert_eq!(fs::read(&inside).unwrap(), b"pwned2");
        assert_eq!(fs::read(root.join("hostfile")).unwrap(), b"pwned3");
        assert!(!fs::symlink_metadata(root.join("hostfile"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn zstd_layer_rejected() {
        let t = TempDir::new("zstd");
        let layout = t.0.join("layout");
        make_layout(
            &layout,
            &[(
                b"not really zstd".to_vec(),
                "application/vnd.oci.image.layer.v1.tar+zstd",
            )],
            empty_config(),
        );
        let err = unpack_dir(&t, &layout).unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedLayer { .. }), "{err}");
        assert!(err.to_string().contains("zstd"), "{err}");
    }

    #[test]
    fn nested_index_prefers_linux_amd64() {
        let t = TempDir::new("nested");
        let layout = t.0.join("layout");
        let amd = make_layout(
            &layout,
            &[(layer(&[E::File("amd64", b"", 0o644)]), TAR)],
            empty_config(),
        );
        // An arm64 manifest alongside it.
        let arm_layer = layer(&[E::File("arm64", b"", 0o644)]);
        let arm_layer_d = put_blob(&layout, &arm_layer);
        let cfg = serde_json::to_vec(&empty_config()).unwrap();
        let cfg_d = put_blob(&layout, &cfg);
        let arm_manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": desc("application/vnd.oci.image.config.v1+json", &cfg_d, cfg.len()),
            "layers": [desc(TAR, &arm_layer_d, arm_layer.len())],
        }))
        .unwrap();
        let arm_d = put_blob(&layout, &arm_manifest);
        let amd_size = fs::metadata(layout.join("blobs/sha256").join(&amd[7..]))
            .unwrap()
            .len() as usize;
        let mut arm_desc = desc(MT_OCI_MANIFEST, &arm_d, arm_manifest.len());
        arm_desc["platform"] =
            serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
        let mut amd_desc = desc(MT_OCI_MANIFEST, &amd, amd_size);
        amd_desc["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
        let inner = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [arm_desc, amd_desc],
        }))
        .unwrap();
        let inner_d = put_blob(&layout, &inner);
        let outer = serde_json::json!({"schemaVersion": 2, "manifests": [desc(MT_OCI_INDEX, &inner_d, inner.len())]});
        fs::write(
            layout.join("index.json"),
            serde_json::to_vec(&outer).unwrap(),
        )
        .unwrap();
        let (_, root) = unpack_dir(&t, &layout).unwrap();
        assert!(root.join("amd64").exists());
        assert!(!root.join("arm64").exists());
    }

    #[test]
    fn detect_kinds_and_errors() {
        let t = TempDir::new("detect");
        let missing = t.0.join("nope");
        let err = detect(&missing).unwrap_err();
        assert!(matches!(err, ImageError::NotFound { .. }));
        assert!(err.to_string().contains(
            "does not exist: give a rootfs directory or an OCI image layout (directory or .tar)"
        ));
        assert!(err.to_string().contains(missing.to_str().unwrap()));

        let empty = t.sub("empty");
        let err = detect(&empty).unwrap_err();
        assert!(
            matches!(err, ImageError::EmptyRootfs { .. })
                && err.to_string().contains("has no files"),
            "{err}"
        );

        let rootfs = t.sub("rootfs");
        fs::create_dir(rootfs.join("bin")).unwrap();
        assert_eq!(detect(&rootfs).unwrap(), ImageKind::RootfsDir);

        let file = t.0.join("x.tar");
        fs::write(&file, b"").unwrap();
        assert_eq!(detect(&file).unwrap(), ImageKind::OciLayoutTar);

        let layout = t.0.join("layout");
        make_layout(&layout, &[], empty_config());
        assert_eq!(detect(&layout).unwrap(), ImageKind::OciLayoutDir);

        fs::remove_file(layout.join("index.json")).unwrap();
        let err = detect(&layout).unwrap_err();
        assert!(matches!(err, ImageError::Malformed { .. }), "{err}");
        assert!(
            err.to_string().contains("malformed OCI layout")
                && err.to_string().contains("index.json"),
            "{err}"
        );

        fs::write(layout.join("index.json"), b"{not json").unwrap();
        assert!(matches!(
            detect(&layout).unwrap_err(),
            ImageError::Malformed { .. }
        ));

        fs::write(
            layout.join("index.json"),
            vec![b' '; MAX_JSON_BYTES as usize + 1],
        )
        .unwrap();
        assert!(matches!(
            detect(&layout).unwrap_err(),
            ImageError::JsonTooLarge { .. }
        ));

        let only_index = t.sub("only-index");
        fs::write(
            only_index.join("index.json"),
            r#"{"schemaVersion":2,"manifests":[]}"#,
        )
        .unwrap();
        let err = detect(&only_index).unwrap_err();
        assert!(err.to_string().contains("oci-layout is missing"), "{err}");
    }

    /// Unpacks the image from tests/images/build-busybox-image.sh when
    /// HULL_TEST_BUSYBOX_IMAGE names its output directory; skipped otherwise.
    #[test]
    fn busybox_image_from_build_script() {
        let Some(dir) = std::env::var_os("HULL_TEST_BUSYBOX_IMAGE") else {
            return;
        };
        let dir = PathBuf::from(dir);
        assert_eq!(detect(&dir.join("rootfs")).unwrap(), ImageKind::RootfsDir);
        for (src, kind) in [
            ("oci", ImageKind::OciLayoutDir),
            ("busybox-oci.tar", ImageKind::OciLayoutTar),
        ] {
            let t = TempDir::new("busybox");
            let src = dir.join(src);
            assert_eq!(detect(&src).unwrap(), kind);
            let rootfs = t.sub("rootfs");
            let cfg = unpack(&src, kind, &t.sub("scratch"), &rootfs).unwrap();
            assert_eq!(cfg.cmd, vec!["sh".to_string()]);
            assert_eq!(cfg.working_dir.as_deref(), Some("/"));
            assert!(cfg.env[0].starts_with("PATH="));
            assert_eq!(
                fs::read_link(rootfs.join("usr/bin/env")).unwrap(),
                Path::new("/bin/busybox")
            );
            assert!(fs::metadata(rootfs.join("bin/busybox")).unwrap().len() > 100_000);
            assert_eq!(
                fs::metadata(rootfs.join("tmp")).unwrap().mode() & 0o7777,
                0o1777
            );
            if is_root() {
                assert_eq!(fs::metadata(rootfs.join("home/hull")).unwrap().uid(), 1000);
            }
            assert!(fs::read_to_string(rootfs.join("etc/group"))
                .unwrap()
                .contains("wheel:x:10:hull"));
        }
    }
}
