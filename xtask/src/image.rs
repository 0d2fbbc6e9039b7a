//! `cargo xtask image`: the multi-architecture OCI image (linux/arm64 for the Pi 5, linux/amd64),
//! written directly as an OCI image layout (tar, gzip, sha256, JSON) from the two static musl
//! binaries: no Docker engine, no base image, one layer holding `/auditor` and nothing else.
//! `skopeo copy --all oci:target/image/flow-auditor:TAG docker://REGISTRY/flow-auditor:TAG`
//! pushes it; the checks below prove skopeo reads both architectures and the binaries run.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::deploy::Checks;
use crate::{Elf, X86_64_TARGET, display};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Where the binary sits in the image; the `DaemonSet`'s args follow it.
const ENTRYPOINT: &str = "/auditor";
const EM_X86_64: u16 = 62;

/// One architecture of the image.
struct Arch {
    /// OCI/Go name: `arm64`, `amd64`.
    oci: &'static str,
    variant: Option<&'static str>,
    machine: u16,
    binary: PathBuf,
}

/// A blob written to the layout, as a descriptor names it.
struct Blob {
    digest: String,
    size: u64,
}

/// Builds both binaries and the image, then checks it; prints `image: N passed, M failed`.
/// Returns the static amd64 binary the image holds (`cargo xtask test` runs the lab with it).
pub fn run(root: &Path) -> Result<PathBuf> {
    let arm64 = build_static(root, crate::AARCH64_TARGET)?;
    crate::check_static_aarch64(&arm64)?;
    let amd64 = build_static(root, X86_64_TARGET)?;
    let objcopy = Objcopy::find(root)?;
    let arm64 = objcopy.strip(&arm64, &shipped_path(root, "arm64"))?;
    let amd64 = objcopy.strip(&amd64, &shipped_path(root, "amd64"))?;
    let amd64_binary = amd64.clone();
    let tag = env!("CARGO_PKG_VERSION");
    let layout = root.join("target/image/flow-auditor");
    let arches = [
        Arch {
            oci: "arm64",
            variant: Some("v8"),
            machine: crate::EM_AARCH64,
            binary: arm64,
        },
        Arch {
            oci: "amd64",
            variant: None,
            machine: EM_X86_64,
            binary: amd64,
        },
    ];
    write_layout(&layout, tag, &arches)?;
    let archive = root.join(format!("target/image/flow-auditor-{tag}.oci.tar"));
    write_archive(&layout, &archive)?;
    eprintln!(
        "image: wrote the OCI layout {} (tag {tag}) and the archive {}",
        layout.display(),
        archive.display()
    );
    check(&layout, tag, &arches)?;
    eprintln!(
        "push it with: skopeo copy --all oci:{}:{tag} docker://REGISTRY/flow-auditor:{tag}\n\
         then: cd deploy/overlays/<cni> && kustomize edit set image flow-auditor=REGISTRY/flow-auditor:{tag}",
        layout.display()
    );
    Ok(amd64_binary)
}

/// Where the image's binary for the OCI architecture `oci` (`arm64`, `amd64`) is written.
fn shipped_path(root: &Path, oci: &str) -> PathBuf {
    root.join("target/image/bin").join(oci).join("auditor")
}

/// The stripped static binary the image ships for `target` (a musl target triple), built and
/// stripped as [`run`] does (cargo makes that a no-op when it is up to date), without the image.
pub fn shipped_binary(root: &Path, target: &str) -> Result<PathBuf> {
    let oci = match target {
        crate::AARCH64_TARGET => "arm64",
        X86_64_TARGET => "amd64",
        other => bail!("the image ships no binary for {other}"),
    };
    let binary = build_static(root, target)?;
    Objcopy::find(root)?.strip(&binary, &shipped_path(root, oci))
}

/// A static musl release binary, linked by zig (ring, under kube's TLS, has C code). Honours
/// `CARGO_TARGET_DIR` like the cargo it runs.
fn build_static(root: &Path, target: &str) -> Result<PathBuf> {
    let mut cmd = crate::cargo(root);
    cmd.args(["zigbuild", "--target", target]).args([
        "--release",
        "--package",
        "auditor",
        "--bin",
        "auditor",
    ]);
    crate::run(&mut cmd)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    Ok(target_dir.join(target).join("release/auditor"))
}

/// The pinned toolchain's `rust-objcopy` (LLVM's, any architecture; part of rustc itself, so
/// nothing to install), which loads the toolchain's libLLVM.
struct Objcopy {
    program: PathBuf,
    sysroot_lib: PathBuf,
}

impl Objcopy {
    fn find(root: &Path) -> Result<Self> {
        let rustc = |arg: &str| -> Result<String> {
            let mut cmd = Command::new("rustc");
            cmd.current_dir(root).arg(arg);
            // The toolchain rust-toolchain.toml pins, not the one running xtask.
            cmd.env_remove("RUSTC").env_remove("RUSTUP_TOOLCHAIN");
            let out = cmd
                .output()
                .with_context(|| format!("could not start {}", display(&cmd)))?;
            ensure!(out.status.success(), "{} failed", display(&cmd));
            String::from_utf8(out.stdout).context("rustc output is not UTF-8")
        };
        let sysroot = PathBuf::from(rustc("--print=sysroot")?.trim());
        let host = rustc("-vV")?
            .lines()
            .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
            .ok_or_else(|| anyhow!("rustc -vV names no host"))?;
        let program = sysroot
            .join("lib/rustlib")
            .join(host)
            .join("bin/rust-objcopy");
        ensure!(
            program.is_file(),
            "{} is missing (it ships with rustc)",
            program.display()
        );
        Ok(Self {
            program,
            sysroot_lib: sysroot.join("lib"),
        })
    }

    /// `binary` without its symbol table and debug info, written to `out`: they are a quarter
    /// of the compressed layer and nothing in a container reads them. (The eBPF object and its
    /// BTF are data inside the binary, untouched.)
    fn strip(&self, binary: &Path, out: &Path) -> Result<PathBuf> {
        let dir = out
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", out.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let partial = out.with_extension("partial");
        let mut cmd = Command::new(&self.program);
        cmd.env("LD_LIBRARY_PATH", &self.sysroot_lib)
            .arg("--strip-all")
            .arg(binary)
            .arg(&partial);
        crate::run(&mut cmd)?;
        std::fs::rename(&partial, out)
            .with_context(|| format!("moving {} to {}", partial.display(), out.display()))?;
        Ok(out.to_path_buf())
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Result<Blob> {
    let hex = sha256_hex(bytes);
    let path = layout.join("blobs/sha256").join(&hex);
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    })
}

fn to_json(value: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(value).context("encoding JSON")
}

/// The one layer: `/auditor`, root-owned, 0755, with a fixed mtime so the same binary gives the
/// same digest. Returns (gzip bytes, uncompressed tar digest).
fn layer(binary: &Path) -> Result<(Vec<u8>, String)> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(
        &mut header,
        ENTRYPOINT.trim_start_matches('/'),
        bytes.as_slice(),
    )
    .context("writing the layer tar")?;
    let tar = tar.into_inner().context("finishing the layer tar")?;
    let diff_id = format!("sha256:{}", sha256_hex(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).context("compressing the layer")?;
    let gz = gz.finish().context("compressing the layer")?;
    Ok((gz, diff_id))
}

/// Writes the layout into a fresh directory beside `layout`, then swaps it in: a failure leaves
/// the previous image (or none), never half of one.
fn write_layout(layout: &Path, tag: &str, arches: &[Arch]) -> Result<()> {
    let parent = layout
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", layout.display()))?;
    let staging = parent.join(format!(".flow-auditor-staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(staging.join("blobs/sha256"))
        .with_context(|| format!("creating {}", staging.display()))?;
    let result = fill_layout(&staging, tag, arches);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(layout);
    std::fs::rename(&staging, layout)
        .with_context(|| format!("moving {} to {}", staging.display(), layout.display()))
}

fn fill_layout(dir: &Path, tag: &str, arches: &[Arch]) -> Result<()> {
    let mut manifests = Vec::new();
    for arch in arches {
        let elf_bytes = std::fs::read(&arch.binary)
            .with_context(|| format!("reading {}", arch.binary.display()))?;
        let elf = Elf::parse(&elf_bytes)
            .ok_or_else(|| anyhow!("{} is not an ELF file", arch.binary.display()))?;
        ensure!(
            elf.machine == arch.machine && !elf.has_interp,
            "{} is not a static {} binary",
            arch.binary.display(),
            arch.oci
        );
        let (gz, diff_id) = layer(&arch.binary)?;
        let layer = put_blob(dir, &gz)?;
        let mut config = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": arch.oci,
            "os": "linux",
            "config": {
                "Entrypoint": [ENTRYPOINT],
                "Cmd": ["run"],
                "User": "0:0",
                "Labels": {
                    "org.opencontainers.image.title": "flow-auditor",
                    "org.opencontainers.image.version": tag,
                    "org.opencontainers.image.source": env!("CARGO_PKG_REPOSITORY"),
                    "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
                },
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
            "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" }],
        });
        if let Some(variant) = arch.variant {
            config["variant"] = json!(variant);
        }
        let config = put_blob(dir, &to_json(&config)?)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": { "mediaType": CONFIG, "digest": config.digest, "size": config.size },
            "layers": [{ "mediaType": LAYER, "digest": layer.digest, "size": layer.size }],
        });
        let manifest = put_blob(dir, &to_json(&manifest)?)?;
        let mut platform = json!({ "architecture": arch.oci, "os": "linux" });
        if let Some(variant) = arch.variant {
            platform["variant"] = json!(variant);
        }
        manifests.push(json!({
            "mediaType": MANIFEST,
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": platform,
        }));
    }
    let index = json!({ "schemaVersion": 2, "mediaType": INDEX, "manifests": manifests });
    let index = put_blob(dir, &to_json(&index)?)?;
    let top = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": INDEX,
            "digest": index.digest,
            "size": index.size,
            "annotations": { REF_NAME: tag },
        }],
    });
    write_file(&dir.join("index.json"), &to_json(&top)?)?;
    write_file(
        &dir.join("oci-layout"),
        &to_json(&json!({ "imageLayoutVersion": "1.0.0" }))?,
    )
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// The same layout as one tar file (`skopeo copy oci-archive:FILE ...`).
fn write_archive(layout: &Path, archive: &Path) -> Result<()> {
    let partial = archive.with_extension("tar.partial");
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all(".", layout)
        .with_context(|| format!("archiving {}", layout.display()))?;
    let mut out = tar.into_inner().context("finishing the archive")?;
    out.flush().context("writing the archive")?;
    drop(out);
    std::fs::rename(&partial, archive)
        .with_context(|| format!("moving {} to {}", partial.display(), archive.display()))
}

/// Reads a blob back, checking its digest as any client would.
fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| anyhow!("digest {digest} is not sha256"))?;
    let path = layout.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        sha256_hex(&bytes) == hex,
        "blob {digest} does not match its digest"
    );
    Ok(bytes)
}

fn skopeo(args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("skopeo");
    cmd.args(args);
    eprintln!("+ {}", display(&cmd));
    let out = cmd.output().with_context(|| {
        format!(
            "could not start {} (cargo xtask setup installs skopeo)",
            display(&cmd)
        )
    })?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            display(&cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("skopeo output is not UTF-8")
}

/// Parses a skopeo raw index into `(os/architecture, manifest digest)` pairs.
fn platforms(raw: &str) -> Result<Vec<(String, String)>> {
    let index: Value = serde_json::from_str(raw).context("the raw manifest is not JSON")?;
    ensure!(index["mediaType"] == INDEX, "not an OCI image index: {raw}");
    Ok(index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                format!(
                    "{}/{}",
                    m["platform"]["os"].as_str().unwrap_or("?"),
                    m["platform"]["architecture"].as_str().unwrap_or("?")
                ),
                m["digest"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn check(layout: &Path, tag: &str, arches: &[Arch]) -> Result<()> {
    let mut checks = Checks::new("image");
    let reference = format!("oci:{}:{tag}", layout.display());
    let raw = skopeo(&["inspect", "--raw", &reference]);
    checks.record(
        "skopeo inspect --raw shows linux/arm64 and linux/amd64",
        raw.as_ref().map_err(|e| anyhow!("{e:#}")).and_then(|raw| {
            let mut got: Vec<String> = platforms(raw)?.into_iter().map(|(p, _)| p).collect();
            got.sort();
            ensure!(got == ["linux/amd64", "linux/arm64"], "platforms {got:?}");
            Ok(())
        }),
    );
    for arch in arches {
        checks.record(
            &format!(
                "skopeo inspect --override-arch {} picks its manifest",
                arch.oci
            ),
            skopeo(&[
                "inspect",
                "--override-os",
                "linux",
                "--override-arch",
                arch.oci,
                &reference,
            ])
            .and_then(|text| {
                let v: Value = serde_json::from_str(&text).context("skopeo inspect output")?;
                ensure!(
                    v["Architecture"] == arch.oci,
                    "Architecture {}",
                    v["Architecture"]
                );
                Ok(())
            }),
        );
    }
    // What a push does, minus the network: copy every architecture to another layout.
    let copy = std::env::temp_dir().join(format!("flow-auditor-image-copy-{}", std::process::id()));
    let copied = skopeo(&[
        "copy",
        "--all",
        "--quiet",
        &reference,
        &format!("oci:{}:{tag}", copy.display()),
    ])
    .and_then(|_| skopeo(&["inspect", "--raw", &format!("oci:{}:{tag}", copy.display())]))
    .and_then(|copied| {
        let original = raw.as_ref().map_err(|e| anyhow!("{e:#}"))?;
        ensure!(
            platforms(&copied)? == platforms(original)?,
            "the copy lists other manifests"
        );
        Ok(())
    });
    let _ = std::fs::remove_dir_all(&copy);
    checks.record("skopeo copy --all copies both architectures", copied);
    for arch in arches {
        checks.record(
            &format!("the {} layer holds only /auditor, and it runs", arch.oci),
            unpack_and_run(layout, arch, tag),
        );
    }
    checks.finish()
}

/// Follows the layout from index.json to the architecture's layer, as a runtime would, unpacks
/// it and runs `auditor --version` (arm64 under qemu-aarch64-static).
#[expect(
    clippy::cast_precision_loss,
    reason = "mebibytes printed to one decimal place"
)]
fn unpack_and_run(layout: &Path, arch: &Arch, tag: &str) -> Result<()> {
    let top: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?).context("index.json")?;
    let index_digest = top["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["annotations"][REF_NAME] == tag)
        .and_then(|m| m["digest"].as_str())
        .ok_or_else(|| anyhow!("index.json has no {tag}"))?;
    let index: Value = serde_json::from_slice(&read_blob(layout, index_digest)?)?;
    let manifest_digest = index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["platform"]["architecture"] == arch.oci)
        .and_then(|m| m["digest"].as_str())
        .ok_or_else(|| anyhow!("no {} manifest", arch.oci))?;
    let manifest: Value = serde_json::from_slice(&read_blob(layout, manifest_digest)?)?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    ensure!(layers.len() == 1, "{} layers, want 1", layers.len());
    let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
    let config: Value = serde_json::from_slice(&read_blob(layout, config_digest)?)?;
    ensure!(
        config["architecture"] == arch.oci,
        "config architecture {}",
        config["architecture"]
    );
    let gz = read_blob(layout, layers[0]["digest"].as_str().unwrap_or_default())?;
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice())
        .read_to_end(&mut tar_bytes)
        .context("gunzip the layer")?;
    ensure!(
        config["rootfs"]["diff_ids"][0] == format!("sha256:{}", sha256_hex(&tar_bytes)),
        "the layer does not match the config's diff_id"
    );
    let dir = std::env::temp_dir().join(format!(
        "flow-auditor-image-{}-{}",
        arch.oci,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut names = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            names.push(entry.path()?.display().to_string());
            entry.unpack_in(&dir)?;
        }
        ensure!(
            names == ["auditor"],
            "the layer holds {names:?}, want only auditor"
        );
        let binary = dir.join("auditor");
        let mut cmd = if arch.oci == "arm64" {
            let mut c = Command::new("qemu-aarch64-static");
            c.arg(&binary);
            c
        } else {
            Command::new(&binary)
        };
        cmd.arg("--version");
        eprintln!("+ {}", display(&cmd));
        let out = cmd
            .output()
            .with_context(|| format!("could not start {}", display(&cmd)))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.trim() == format!("auditor {tag}"),
            "{} printed {stdout:?} ({})",
            display(&cmd),
            out.status
        );
        eprintln!(
            "image: {} layer {:.1} MiB compressed, {:.1} MiB unpacked: {}",
            arch.oci,
            gz.len() as f64 / 1_048_576.0,
            tar_bytes.len() as f64 / 1_048_576.0,
            stdout.trim()
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        // FIPS 180-2 test vector "abc".
        let got = sha256_hex(b"abc");
        assert!(
            got == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256(abc) = {got}"
        );
    }

    #[test]
    fn the_layer_is_reproducible_and_holds_one_executable() {
        let dir =
            std::env::temp_dir().join(format!("flow-auditor-layer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let binary = dir.join("bin");
        std::fs::write(&binary, b"\x7fELF not really").unwrap_or_else(|e| panic!("writing: {e}"));
        let (a, id_a) = layer(&binary).unwrap_or_else(|e| panic!("layer: {e:#}"));
        let (b, id_b) = layer(&binary).unwrap_or_else(|e| panic!("layer: {e:#}"));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            !(a != b || id_a != id_b),
            "two layers of the same binary differ"
        );
        let mut tar_bytes = Vec::new();
        flate2::read::GzDecoder::new(a.as_slice())
            .read_to_end(&mut tar_bytes)
            .unwrap_or_else(|e| panic!("gunzip: {e}"));
        assert!(
            id_a == format!("sha256:{}", sha256_hex(&tar_bytes)),
            "diff_id is not the digest of the uncompressed tar"
        );
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let entries: Vec<(String, u32)> = archive
            .entries()
            .unwrap_or_else(|e| panic!("entries: {e}"))
            .map(|e| {
                let e = e.unwrap_or_else(|e| panic!("entry: {e}"));
                let path = e
                    .path()
                    .unwrap_or_else(|e| panic!("path: {e}"))
                    .display()
                    .to_string();
                let mode = e.header().mode().unwrap_or_else(|e| panic!("mode: {e}"));
                (path, mode)
            })
            .collect();
        assert!(
            entries == [("auditor".to_owned(), 0o755)],
            "layer entries {entries:?}"
        );
    }
}
