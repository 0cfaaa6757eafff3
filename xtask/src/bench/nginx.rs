//! The upstream every scenario talks to: Debian's nginx serving a small
//! static body at 169.254.171.33:80 inside the pod's namespace, and taking
//! PUT uploads (WebDAV module: it reads the whole body before answering, so
//! an upload's time covers every byte). Its config, pid file, logs and files
//! live in the scenario's scratch directory; it never listens on the host.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lattice_tests::{ChildGuard, netns::Netns};

use super::{
    interrupt::Interrupt,
    process::{log_tail, stop_gracefully},
};
use crate::cmd;

pub const ADDR: &str = "169.254.171.33";
/// The static body: small, like a typical API answer.
pub const BODY: &str = "{\"service\":\"lattice-bench\",\"ok\":true}\n";

pub struct Nginx {
    pub process: ChildGuard,
}

impl Nginx {
    pub fn start(ns: &Netns, cgroup: &Path, dir: &Path, stop: &Interrupt) -> Result<Self> {
        let www = dir.join("www");
        let upload = www.join("upload");
        let body_tmp = dir.join("body-tmp");
        for d in [&www, &upload, &body_tmp] {
            fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        // Workers run as nobody: they read www and write uploads there.
        for (d, mode) in [
            (dir, 0o755),
            (&www, 0o755),
            (&upload, 0o777),
            (&body_tmp, 0o777),
        ] {
            fs::set_permissions(d, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", d.display()))?;
        }
        fs::write(www.join("index.json"), BODY).context("writing the static body")?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(dir)).context("writing nginx.conf")?;
        let mut command = ns.command("nginx").cgroup(cgroup).build();
        command
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf);
        let name = cmd::display(&command);
        let process = ChildGuard::spawn(command, name);
        let mut nginx = Self { process };

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            stop.check()?;
            if let Some(status) = nginx.process.try_wait() {
                bail!(
                    "nginx exited at start ({status}):\n{}\n{}",
                    log_tail(&nginx.process.stderr()),
                    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            let probe = cmd::read(
                &mut ns
                    .command("curl")
                    .args([
                        "-sS",
                        "--max-time",
                        "2",
                        &format!("http://{ADDR}/index.json"),
                    ])
                    .build(),
            );
            if probe.as_deref().is_ok_and(|b| b == BODY) {
                return Ok(nginx);
            }
            if Instant::now() > deadline {
                bail!("nginx did not answer within 10s: {probe:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of master and workers.
        stop_gracefully(&mut self.process, nix::libc::SIGQUIT);
    }
}

fn config(dir: &Path) -> String {
    let d = dir.display();
    // One worker: the same fixed upstream cost in every scenario, leaving
    // the second core to the load generator and the agent. keepalive_requests
    // is raised so keep-alive runs are not broken up every 1000 requests.
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
user nobody nogroup;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body-tmp;
    proxy_temp_path {d}/body-tmp;
    fastcgi_temp_path {d}/body-tmp;
    uwsgi_temp_path {d}/body-tmp;
    scgi_temp_path {d}/body-tmp;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/json;
    server {{
        listen {ADDR}:80;
        root {d}/www;
        location /upload/ {{
            dav_methods PUT;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
    }}
}}
"#
    )
}
