//! The streamed upload: curl PUTs a 256 MiB file (sparse, so reading it
//! costs nothing) to nginx, as the app, with a Content-Length.

use std::{
    fs::{self, File},
    path::Path,
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use lattice_tests::netns::Netns;

use super::{interrupt::Interrupt, nginx};
use crate::cmd;

pub const SIZE: u64 = 256 * 1024 * 1024;

pub struct UploadResult {
    pub bytes: u64,
    pub seconds: f64,
}

impl UploadResult {
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.seconds
    }
}

pub fn run(ns: &Netns, app_cgroup: &Path, dir: &Path, stop: &Interrupt) -> Result<UploadResult> {
    let file = dir.join("upload.bin");
    File::create(&file)
        .and_then(|f| f.set_len(SIZE))
        .context("creating the upload file")?;
    let out_file = dir.join("upload.out");
    let mut command = ns.command("curl").cgroup(app_cgroup).build();
    command
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_upload} %{time_total}",
            "-T",
        ])
        .arg(&file)
        .arg(format!("http://{}/upload/blob", nginx::ADDR))
        .stdin(Stdio::null())
        .stdout(File::create(&out_file).context("creating curl's output")?);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&command)))?;
    let status = stop.wait(&mut child, Duration::from_secs(300), "the upload")?;
    let out = fs::read_to_string(&out_file).unwrap_or_default();
    // nginx keeps the uploaded copy in memory (tmpfs): drop it at once.
    let _ = fs::remove_file(dir.join("www/upload/blob"));
    let _ = fs::remove_file(&file);
    if !status.success() {
        bail!("upload failed ({status}): {out}");
    }
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [code, bytes, seconds] = fields[..] else {
        bail!("unexpected curl output {out:?}");
    };
    if !code.starts_with('2') {
        bail!("upload answered HTTP {code}");
    }
    let bytes: f64 = bytes.parse().context("curl's size_upload")?;
    let seconds: f64 = seconds.parse().context("curl's time_total")?;
    if bytes as u64 != SIZE {
        bail!("uploaded {bytes} bytes, expected {SIZE}");
    }
    Ok(UploadResult {
        bytes: bytes as u64,
        seconds,
    })
}
