//! The upstream every scenario talks to: Debian's nginx serving a small
//! static body at 169.254.171.33:80 inside the pod's namespace, and taking
//! PUT uploads (WebDAV module: it reads the whole body before answering, so
//! an upload's time covers every byte). Its config, pid file, logs and files
//! live in the scenario's scratch directory; it never listens on the host.
//! For the `tls` scenario it also listens with TLS on port 443, with a
//! certificate for its address from a CA made for the run (`tls/ca.pem`
//! in the scratch directory, which the agent is given as `--ca-file`).

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use lattice_tests::{ChildGuard, netns::Netns};

use super::{
    interrupt::Interrupt,
    process::{stop_gracefully, wait_ready},
};
use crate::cmd;

pub const ADDR: &str = "169.254.171.33";
/// The static body: small, like a typical API answer.
pub const BODY: &str = "{\"service\":\"lattice-bench\",\"ok\":true}\n";

pub struct Nginx {
    pub process: ChildGuard,
}

impl Nginx {
    pub fn start(
        ns: &Netns,
        cgroup: &Path,
        dir: &Path,
        tls: bool,
        stop: &Interrupt,
    ) -> Result<Self> {
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
        let tls_server = if tls {
            make_certificates(&dir.join("tls"))?;
            tls_server(dir)
        } else {
            String::new()
        };
        let conf = dir.join("nginx.conf");
        fs::write(&conf, config(dir, &tls_server)).context("writing nginx.conf")?;
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

        wait_ready(
            &mut nginx.process,
            Duration::from_secs(10),
            Duration::from_millis(50),
            stop,
            |_| {
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
                match probe {
                    Ok(body) if body == BODY => Ok(()),
                    other => Err(format!("answered {other:?}; error.log: {}", error_log(dir))),
                }
            },
        )?;
        Ok(nginx)
    }
}

/// nginx's own log of what went wrong at start.
fn error_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("error.log")).unwrap_or_default()
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: graceful stop of master and workers.
        stop_gracefully(&mut self.process, nix::libc::SIGQUIT);
    }
}

/// A CA (`ca.pem`) and a server certificate it issued for [`ADDR`]
/// (`server.pem`, `server.key`), P-256, made with openssl in `tls_dir`.
fn make_certificates(tls_dir: &Path) -> Result<()> {
    fs::create_dir_all(tls_dir).with_context(|| format!("mkdir {}", tls_dir.display()))?;
    let at = |name: &str| tls_dir.join(name).to_string_lossy().into_owned();
    fs::write(
        at("server.ext"),
        format!(
            "subjectAltName=IP:{ADDR}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .context("writing the certificate's extensions")?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    cmd::read(
        std::process::Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args([
                "-keyout",
                &at("ca.key"),
                "-out",
                &at("ca.pem"),
                "-days",
                "7",
            ])
            .args(["-subj", "/CN=lattice bench CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign"]),
    )?;
    cmd::read(
        std::process::Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-keyout", &at("server.key"), "-out", &at("server.csr")])
            .args(["-subj", &format!("/CN={ADDR}")]),
    )?;
    cmd::read(
        std::process::Command::new("openssl")
            .args(["x509", "-req", "-in", &at("server.csr")])
            .args([
                "-CA",
                &at("ca.pem"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
            ])
            .args(["-out", &at("server.pem"), "-days", "7"])
            .args(["-extfile", &at("server.ext")]),
    )?;
    // Read by nginx's master (root); the workers only use it.
    fs::set_permissions(tls_dir, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", tls_dir.display()))?;
    Ok(())
}

/// The server's TLS listener on 443 (HTTP/1.1: what the agent offers
/// HTTP/1.1 clients), beside its plain one: the same content and uploads.
fn tls_server(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"
        listen {ADDR}:443 ssl;
        ssl_certificate {d}/tls/server.pem;
        ssl_certificate_key {d}/tls/server.key;"#
    )
}

fn config(dir: &Path, tls_server: &str) -> String {
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
        listen {ADDR}:80;{tls_server}
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
